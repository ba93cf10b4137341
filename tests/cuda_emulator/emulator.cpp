// A CPU emulator of src/cuda/kernels.cu, built as a shared library that the Rust launcher drives
// in place of the CUDA driver (`batchnorm::cuda::Device::emulator`, tests/cuda_emulator.rs).
//
// A launch runs its blocks one at a time in an order shuffled by a seed, so any block can be a
// channel's last. A block's threads are fibers (ucontext) on one OS thread, switched only where
// CUDA threads meet: `__syncthreads` releases when every thread of the block waits at the same
// line, `__shfl_down_sync` when all 32 lanes of the warp have arrived at the same line. It stops
// with an error on a barrier reached from different lines or after threads exited, a full-mask
// shuffle after lanes exited, and a deadlock. What it cannot show: concurrency between blocks
// and the memory model across them, FMA contraction (the GPU fuses a*b+c, this build does not),
// alignment faults, speed.
//
// Built with -fsanitize=address (tests/cuda_emulator.rs does, in a child process that preloads
// the runtime), every kernel access is checked: the guards around each allocation are poisoned
// (batchnorm_emulator_poison), so a read or write outside an array stops with a report, as
// out-of-bounds shared memory and per-thread arrays do. The fibers tell AddressSanitizer about
// each stack switch.

#include "cuda_shim.h"
#include "kernels.cu"

#include <setjmp.h>
#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace emu {
namespace {

constexpr unsigned WARP = 32;
constexpr size_t STACK_BYTES = 256 * 1024;

enum class State { Ready, AtBarrier, AtShuffle, Done };

// A fiber starts once through swapcontext (which gives it its own stack) and from then on
// switches with _setjmp/_longjmp, which, unlike swapcontext, make no system call.
struct Fiber {
    ucontext_t context;
    jmp_buf jump;
    bool started = false;
    State state = State::Ready;
    int line = 0;
    uint64_t value = 0;  // a shuffle's value in, then the value it receives
    int delta = 0;
    unsigned mask = 0;
};

struct Block {
    unsigned threads = 0;
    uint3 index{}, grid{};
    std::vector<Fiber> fibers;
    ucontext_t scheduler;
    jmp_buf scheduler_jump;
    unsigned current = 0;
    std::string error;
};

Block* running = nullptr;
void (*entry)(const void*) = nullptr;
const void* entry_args = nullptr;
std::vector<std::vector<char>> stacks;

Fiber& me() { return running->fibers[running->current]; }

// AddressSanitizer must know which stack runs: a switch is announced before the jump and
// completed on the new stack. The scheduler's stack bounds are learnt on its first switch.
#if defined(__SANITIZE_ADDRESS__)
const void* scheduler_stack = nullptr;
size_t scheduler_stack_size = 0;
void to_fiber(unsigned t) { __sanitizer_start_switch_fiber(nullptr, stacks[t].data(), stacks[t].size()); }
void to_scheduler() { __sanitizer_start_switch_fiber(nullptr, scheduler_stack, scheduler_stack_size); }
void on_fiber() { __sanitizer_finish_switch_fiber(nullptr, &scheduler_stack, &scheduler_stack_size); }
void on_scheduler() { __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr); }
#else
void to_fiber(unsigned) {}
void to_scheduler() {}
void on_fiber() {}
void on_scheduler() {}
#endif

void yield() {
    if (!_setjmp(me().jump)) {
        to_scheduler();
        _longjmp(running->scheduler_jump, 1);
    }
    on_fiber();
}

void fiber_main() {
    on_fiber();
    entry(entry_args);
    me().state = State::Done;
    to_scheduler();
    _longjmp(running->scheduler_jump, 1);  // never returns: its first caller's frame is gone
}

// Runs fiber `t` until it waits or ends.
void resume(Block& b, unsigned t) {
    b.current = t;
    Fiber& f = b.fibers[t];
    if (_setjmp(b.scheduler_jump)) {
        on_scheduler();
        return;
    }
    to_fiber(t);
    if (f.started) _longjmp(f.jump, 1);
    f.started = true;
    swapcontext(&b.scheduler, &f.context);
}

std::string at_block(const Block& b) {
    return "block (" + std::to_string(b.index.x) + ", " + std::to_string(b.index.y) + ")";
}

// Releases the warps whose lanes all wait at a shuffle; false (with an error) on misuse.
bool exchange_shuffles(Block& b, bool& progressed) {
    for (unsigned first = 0; first < b.threads; first += WARP) {
        const unsigned last = std::min(b.threads, first + WARP);
        unsigned waiting = 0, done = 0;
        for (unsigned t = first; t < last; t++) {
            waiting += b.fibers[t].state == State::AtShuffle;
            done += b.fibers[t].state == State::Done;
        }
        if (waiting == 0) continue;
        const Fiber& lead = b.fibers[first];
        if (done > 0) {
            b.error = "__shfl_down_sync with the full mask after " + std::to_string(done) + " lanes of warp " +
                      std::to_string(first / WARP) + " exited, in " + at_block(b);
            return false;
        }
        if (waiting < last - first) continue;  // the rest are at a barrier: a deadlock unless they come
        for (unsigned t = first; t < last; t++) {
            const Fiber& f = b.fibers[t];
            if (f.line != lead.line || f.delta != lead.delta || f.mask != 0xffffffffu) {
                b.error = "warp " + std::to_string(first / WARP) + " of " + at_block(b) +
                          " shuffles from different lines or offsets (lines " + std::to_string(lead.line) + " and " +
                          std::to_string(f.line) + ")";
                return false;
            }
        }
        std::vector<uint64_t> values;
        for (unsigned t = first; t < last; t++) values.push_back(b.fibers[t].value);
        for (unsigned t = first; t < last; t++) {
            const unsigned source = t - first + static_cast<unsigned>(lead.delta);
            b.fibers[t].value = source < values.size() ? values[source] : values[t - first];
            b.fibers[t].state = State::Ready;
        }
        progressed = true;
    }
    return true;
}

bool run_block(Block& b) {
    b.fibers.assign(b.threads, Fiber{});
    for (unsigned t = 0; t < b.threads; t++) {
        Fiber& f = b.fibers[t];
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = stacks[t].data();
        f.context.uc_stack.ss_size = stacks[t].size();
        f.context.uc_link = &b.scheduler;
        makecontext(&f.context, fiber_main, 0);
    }
    running = &b;
    for (;;) {
        for (unsigned t = 0; t < b.threads; t++) {
            if (b.fibers[t].state != State::Ready) continue;
            resume(b, t);
            if (!b.error.empty()) return false;
        }
        bool progressed = false;
        if (!exchange_shuffles(b, progressed)) return false;
        if (progressed) continue;
        unsigned live = 0, at_barrier = 0;
        int line = 0, other_line = 0;
        for (const Fiber& f : b.fibers) {
            if (f.state == State::Done) continue;
            live++;
            if (f.state != State::AtBarrier) continue;
            if (at_barrier++ == 0) line = f.line;
            if (f.line != line) other_line = f.line;
        }
        if (live == 0) return true;
        if (at_barrier < live) {
            b.error = "deadlock in " + at_block(b) + ": " + std::to_string(at_barrier) +
                      " threads wait at a barrier, the others at a shuffle their warp never completes";
            return false;
        }
        if (other_line != 0) {
            b.error = "__syncthreads reached from different lines (" + std::to_string(line) + " and " +
                      std::to_string(other_line) + ") in " + at_block(b);
            return false;
        }
        if (live < b.threads) {
            b.error = "__syncthreads at line " + std::to_string(line) + " after " + std::to_string(b.threads - live) +
                      " threads exited, in " + at_block(b);
            return false;
        }
        for (Fiber& f : b.fibers) f.state = State::Ready;
    }
}

struct Entry {
    const char* name;
    void (*run)(const void*);
};

#define FORWARD(name) Entry{#name, [](const void* a) { name(*static_cast<const ForwardArgs*>(a)); }}
#define BACKWARD(name) Entry{#name, [](const void* a) { name(*static_cast<const BackwardArgs*>(a)); }}
#define ENTRY_REDUCTIONS(suffix) FORWARD(statistics_##suffix), BACKWARD(gradient_sums_##suffix)
#define ENTRY_ELEMENTWISE(suffix) FORWARD(normalize_##suffix), BACKWARD(input_gradient_##suffix)

const Entry ENTRIES[] = {
    ENTRY_REDUCTIONS(f32x4),   ENTRY_REDUCTIONS(f32x4u),  ENTRY_REDUCTIONS(f32x1),    ENTRY_REDUCTIONS(f64x2),
    ENTRY_REDUCTIONS(f64x2u),  ENTRY_REDUCTIONS(f64x1),   ENTRY_REDUCTIONS(f16x8),    ENTRY_REDUCTIONS(f16x8u),
    ENTRY_REDUCTIONS(f16x4),   ENTRY_REDUCTIONS(f16x4u),  ENTRY_REDUCTIONS(f16x1),    ENTRY_REDUCTIONS(bf16x8),
    ENTRY_REDUCTIONS(bf16x8u), ENTRY_REDUCTIONS(bf16x4),  ENTRY_REDUCTIONS(bf16x4u),  ENTRY_REDUCTIONS(bf16x1),
    ENTRY_ELEMENTWISE(f32x4),  ENTRY_ELEMENTWISE(f32x1),  ENTRY_ELEMENTWISE(f64x2),   ENTRY_ELEMENTWISE(f64x1),
    ENTRY_ELEMENTWISE(f16x8),  ENTRY_ELEMENTWISE(f16x4),  ENTRY_ELEMENTWISE(f16x1),   ENTRY_ELEMENTWISE(bf16x8),
    ENTRY_ELEMENTWISE(bf16x4), ENTRY_ELEMENTWISE(bf16x1), FORWARD(eval_coefficients_f32), FORWARD(eval_coefficients_f64)};

}  // namespace

uint3 thread_index() { return uint3{running->current, 0, 0}; }
uint3 block_index() { return running->index; }
uint3 grid_dim() { return running->grid; }
uint3 block_dim() { return uint3{running->threads, 1, 1}; }

void sync_threads(int line) {
    me().state = State::AtBarrier;
    me().line = line;
    yield();
}

uint64_t shuffle_down(uint64_t value, unsigned mask, int delta, int line) {
    Fiber& f = me();
    f.state = State::AtShuffle;
    f.value = value;
    f.mask = mask;
    f.delta = delta;
    f.line = line;
    yield();
    return me().value;
}

}  // namespace emu

// Marks `bytes` at `address` as out of bounds (`poisoned` ≠ 0) or back in bounds, for
// AddressSanitizer; without it, nothing to do (the launcher checks the guards' bytes instead).
extern "C" void batchnorm_emulator_poison(const void* address, size_t bytes, int poisoned) {
#if defined(__SANITIZE_ADDRESS__)
    if (poisoned)
        ASAN_POISON_MEMORY_REGION(address, bytes);
    else
        ASAN_UNPOISON_MEMORY_REGION(address, bytes);
#else
    (void)address, (void)bytes, (void)poisoned;
#endif
}

// Runs kernel `name` on a grid of (grid_x, grid_y) blocks of `threads` threads with its one
// argument struct, the blocks in an order drawn from `seed`. 0 on success; otherwise a message
// in `message` and a non-zero return.
extern "C" int batchnorm_emulator_launch(const char* name, unsigned grid_x, unsigned grid_y, unsigned threads,
                                         const void* args, uint64_t seed, char* message, size_t capacity) {
    static std::mutex one_launch_at_a_time;
    std::lock_guard<std::mutex> guard(one_launch_at_a_time);
    auto report = [&](const std::string& text) {
        std::snprintf(message, capacity, "%s", text.c_str());
        return 1;
    };
    const emu::Entry* found = nullptr;
    for (const emu::Entry& e : emu::ENTRIES)
        if (std::strcmp(e.name, name) == 0) found = &e;
    if (!found) return report(std::string("kernels.cu has no kernel ") + name);
    if (threads == 0 || threads > 1024) return report("a block of " + std::to_string(threads) + " threads");
    while (emu::stacks.size() < threads) emu::stacks.emplace_back(emu::STACK_BYTES);
    std::vector<std::pair<unsigned, unsigned>> order;
    for (unsigned y = 0; y < grid_y; y++)
        for (unsigned x = 0; x < grid_x; x++) order.emplace_back(x, y);
    std::mt19937_64 random(seed);
    std::shuffle(order.begin(), order.end(), random);
    emu::entry = found->run;
    emu::entry_args = args;
    for (auto [x, y] : order) {
        emu::Block block;
        block.threads = threads;
        block.index = uint3{x, y, 0};
        block.grid = uint3{grid_x, grid_y, 1};
        if (!emu::run_block(block)) return report(std::string(name) + ": " + block.error);
    }
    return 0;
}
