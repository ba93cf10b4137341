// The emulator's own checks, each on a kernel with the bug it must catch: built and run by
// tests/cuda_emulator.rs. Prints what failed and exits non-zero if a bug goes unnoticed.

#include "emulator.cpp"

#include <cstdio>

namespace {

__device__ void divergent_barrier(const ForwardArgs&) {
    if (threadIdx.x < 128) {
        __syncthreads();
    } else {
        __syncthreads();
    }
}

__device__ void barrier_after_exit(const ForwardArgs&) {
    if (threadIdx.x == 7) return;
    __syncthreads();
}

__device__ void shuffle_after_exit(const ForwardArgs&) {
    if (threadIdx.x % 32 == 31) return;
    double v = __shfl_down_sync(0xffffffffu, 1.0, 1);
    (void)v;
}

__device__ void deadlock(const ForwardArgs&) {
    if (threadIdx.x % 32 < 16) {
        double v = __shfl_down_sync(0xffffffffu, 1.0, 1);
        (void)v;
    }
    __syncthreads();
}

// A correct block reduction, through the same shuffle and shared-memory pattern as kernels.cu.
__device__ void block_sum(const ForwardArgs& a) {
    Sums s{static_cast<double>(threadIdx.x), 1.0};
    s = block_combine(s);
    if (threadIdx.x == 0) static_cast<double*>(a.y)[blockIdx.x] = s.dy + s.dy_xmu;
}

struct Case {
    const char* name;
    void (*kernel)(const ForwardArgs&);
    const char* expected;  // a piece of the error message, or nullptr for a kernel that must pass
};

const Case CASES[] = {
    {"divergent barrier", divergent_barrier, "different lines"},
    {"barrier after exit", barrier_after_exit, "exited"},
    {"shuffle after exit", shuffle_after_exit, "after 1 lanes of warp"},
    {"deadlock", deadlock, "deadlock"},
    {"block sum", block_sum, nullptr},
};

const ForwardArgs* case_args = nullptr;
void (*case_kernel)(const ForwardArgs&) = nullptr;

}  // namespace

int main() {
    int failures = 0;
    double sums[4] = {};
    ForwardArgs args{};
    args.y = sums;
    for (const Case& c : CASES) {
        case_kernel = c.kernel;
        case_args = &args;
        emu::entry = [](const void*) { case_kernel(*case_args); };
        emu::entry_args = &args;
        while (emu::stacks.size() < THREADS) emu::stacks.emplace_back(emu::STACK_BYTES);
        emu::Block block;
        block.threads = THREADS;
        block.grid = uint3{4, 1, 1};
        bool ok = true;
        for (unsigned x = 0; x < 4 && ok; x++) {
            block = emu::Block{};
            block.threads = THREADS;
            block.index = uint3{x, 0, 0};
            block.grid = uint3{4, 1, 1};
            ok = emu::run_block(block);
        }
        const bool caught = !ok && c.expected && block.error.find(c.expected) != std::string::npos;
        const bool passed = ok && !c.expected;
        if (!caught && !passed) {
            std::printf("%s: %s\n", c.name, ok ? "not caught" : block.error.c_str());
            failures++;
        }
    }
    const double expected = THREADS * (THREADS - 1) / 2.0 + THREADS;
    for (double s : sums) {
        if (s != expected) {
            std::printf("block sum: %f, expected %f\n", s, expected);
            failures++;
        }
    }
    return failures;
}
