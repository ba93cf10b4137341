// Probes for the training forward's speed at (32, 64, 56, 56) float32 on a GPU: how fast can one
// read of x go, what the double-precision sums cost, and what a fused kernel that keeps x in shared
// memory between the statistics and the normalization (one read of x, one write of y) reaches.
// Not part of the library: a measurement that decides its design. On a GPU machine:
//   nvcc -O3 -arch=sm_90 -std=c++17 -o /tmp/probe benches/gpu_probe.cu && /tmp/probe
// Inputs rotate over buffers 8 times the L2 so no call finds x in L2 from a previous one.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(call)                                                                        \
    do {                                                                                   \
        cudaError_t e = (call);                                                            \
        if (e != cudaSuccess) {                                                            \
            std::printf("%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e)); \
            std::exit(1);                                                                  \
        }                                                                                  \
    } while (0)

constexpr int N = 32, C = 64, PLANE = 56 * 56, PLANE4 = PLANE / 4;
constexpr size_t VALUES = size_t(N) * C * PLANE;

// Pure read floor: a grid-stride float sum, UNROLL 16-byte loads in flight per thread.
template <int UNROLL>
__global__ void __launch_bounds__(256) read_sum(const float4* x, size_t n4, float* out) {
    float s = 0.f;
    const size_t stride = size_t(gridDim.x) * 256;
    for (size_t i = blockIdx.x * 256 + threadIdx.x; i < n4; i += stride * UNROLL) {
        float4 v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) v[u] = i + u * stride < n4 ? __ldcs(x + i + u * stride) : make_float4(0, 0, 0, 0);
#pragma unroll
        for (int u = 0; u < UNROLL; u++) s += v[u].x + v[u].y + v[u].z + v[u].w;
    }
    if (s == 12345.f) *out = s;  // keeps the loads
}

// The library's statistics-pass shape (channel c, split s; packs in (image, offset) order),
// summing in Acc: float shows what the double arithmetic costs.
template <typename Acc, int LOADS>
__global__ void __launch_bounds__(256, 4) channel_sums(const float4* x, int splits, double* partial) {
    const int c = blockIdx.x, split = blockIdx.y;
    const int count = N * PLANE4, per = (count + splits - 1) / splits;
    const int begin = split * per, end = min(count, begin + per);
    const float shift = reinterpret_cast<const float*>(x)[size_t(c) * PLANE];
    Acc s1 = 0, s2 = 0;
    for (int k = begin + threadIdx.x; k < end; k += 256 * LOADS) {
        float4 v[LOADS];
#pragma unroll
        for (int u = 0; u < LOADS; u++) {
            int kk = k + u * 256;
            if (kk < end) v[u] = x[(size_t(kk / PLANE4) * C + c) * PLANE4 + kk % PLANE4];
        }
#pragma unroll
        for (int u = 0; u < LOADS; u++) {
            if (k + u * 256 < end) {
                Acc d[4] = {Acc(v[u].x) - shift, Acc(v[u].y) - shift, Acc(v[u].z) - shift, Acc(v[u].w) - shift};
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    s1 += d[e];
                    s2 += d[e] * d[e];
                }
            }
        }
    }
    for (int o = 16; o; o /= 2) {
        s1 += __shfl_down_sync(~0u, s1, o);
        s2 += __shfl_down_sync(~0u, s2, o);
    }
    if (threadIdx.x % 32 == 0) atomicAdd(&partial[c * 2], double(s1 + s2));
}

// Fused: block b holds images [16 * (b % 2), +16) of channel b / 2 in shared memory (200704
// bytes), sums them, meets its twin through a counter, then normalizes from shared memory.
constexpr int FUSED_THREADS = 1024, HALF_IMAGES = N / 2, HALF4 = HALF_IMAGES * PLANE4;
constexpr int PER_THREAD = (HALF4 + FUSED_THREADS - 1) / FUSED_THREADS;  // 13

__global__ void __launch_bounds__(FUSED_THREADS, 1)
    fused(const float4* x, float4* y, double* partials, unsigned* arrivals, unsigned epoch) {
    extern __shared__ float4 held[];
    __shared__ double warp_s1[32], warp_s2[32];
    __shared__ float coefficient[2];
    const int c = blockIdx.x / 2, half = blockIdx.x % 2;
    const float shift = reinterpret_cast<const float*>(x)[size_t(c) * PLANE];
    auto address = [&](int i) {
        const int image = half * HALF_IMAGES + i / PLANE4;
        return (size_t(image) * C + c) * PLANE4 + i % PLANE4;
    };
    double s1 = 0, s2 = 0;
    float4 v[PER_THREAD];
#pragma unroll
    for (int k = 0; k < PER_THREAD; k++) {
        const int i = threadIdx.x + k * FUSED_THREADS;
        if (i < HALF4) v[k] = __ldcs(x + address(i));
    }
#pragma unroll
    for (int k = 0; k < PER_THREAD; k++) {
        const int i = threadIdx.x + k * FUSED_THREADS;
        if (i < HALF4) {
            held[i] = v[k];
            const double d[4] = {double(v[k].x) - shift, double(v[k].y) - shift, double(v[k].z) - shift,
                                 double(v[k].w) - shift};
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s1 += d[e];
                s2 = fma(d[e], d[e], s2);
            }
        }
    }
    for (int o = 16; o; o /= 2) {
        s1 += __shfl_down_sync(~0u, s1, o);
        s2 += __shfl_down_sync(~0u, s2, o);
    }
    if (threadIdx.x % 32 == 0) warp_s1[threadIdx.x / 32] = s1, warp_s2[threadIdx.x / 32] = s2;
    __syncthreads();
    if (threadIdx.x < 32) {
        s1 = warp_s1[threadIdx.x], s2 = warp_s2[threadIdx.x];
        for (int o = 16; o; o /= 2) {
            s1 += __shfl_down_sync(~0u, s1, o);
            s2 += __shfl_down_sync(~0u, s2, o);
        }
        if (threadIdx.x == 0) {
            partials[blockIdx.x * 2] = s1;
            partials[blockIdx.x * 2 + 1] = s2;
            __threadfence();
            atomicAdd(&arrivals[c], 1u);
            while (atomicAdd(&arrivals[c], 0u) < 2 * epoch) {}
            __threadfence();
            const int twin = blockIdx.x ^ 1;
            const double t1 = s1 + __ldcg(&partials[twin * 2]), t2 = s2 + __ldcg(&partials[twin * 2 + 1]);
            const double n = double(N) * PLANE, mean = shift + t1 / n, var = (t2 - t1 * (t1 / n)) / n;
            coefficient[0] = float(mean);
            coefficient[1] = float(1.0 / sqrt(var + 1e-5));
        }
    }
    __syncthreads();
    const float mean = coefficient[0], scale = coefficient[1];
#pragma unroll
    for (int k = 0; k < PER_THREAD; k++) {
        const int i = threadIdx.x + k * FUSED_THREADS;
        if (i < HALF4) {
            float4 a = held[i];
            a.x = (a.x - mean) * scale, a.y = (a.y - mean) * scale, a.z = (a.z - mean) * scale, a.w = (a.w - mean) * scale;
            __stcs(y + address(i), a);
        }
    }
}

int main() {
    int sms = 0, l2 = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
    const size_t bytes = VALUES * 4;
    const int sets = int(std::max<size_t>(2, 8 * size_t(l2) / bytes + 1));
    std::vector<float*> xs(sets), ys(sets);
    std::vector<float> host(VALUES);
    for (size_t i = 0; i < VALUES; i++) host[i] = 1.0f + float((i * 2654435761u) % 1000) / 1000.0f;
    for (int s = 0; s < sets; s++) {
        CHECK(cudaMalloc(&xs[s], bytes));
        CHECK(cudaMalloc(&ys[s], bytes));
        CHECK(cudaMemcpy(xs[s], host.data(), bytes, cudaMemcpyHostToDevice));
    }
    double* partials;
    unsigned* arrivals;
    float* sink;
    CHECK(cudaMalloc(&partials, 1 << 20));
    CHECK(cudaMalloc(&arrivals, C * 4));
    CHECK(cudaMalloc(&sink, 4));
    CHECK(cudaMemset(arrivals, 0, C * 4));
    const int fused_smem = HALF4 * 16;
    CHECK(cudaFuncSetAttribute(fused, cudaFuncAttributeMaxDynamicSharedMemorySize, fused_smem));
    unsigned epoch = 0;
    const size_t n4 = VALUES / 4;
    struct Case {
        const char* name;
        int kind;
    };
    const Case cases[] = {{"copy (read x + write y)", 0},   {"read_sum x4, 1 wave of 4/SM", 1}, {"read_sum x8, 1 wave of 4/SM", 2},
                          {"read_sum x4, 8/SM", 3},         {"channel_sums double, 8 splits", 4}, {"channel_sums float, 8 splits", 5},
                          {"channel_sums double, 16 splits", 6}, {"fused (smem), 128 blocks", 7}};
    const int ncases = sizeof(cases) / sizeof(cases[0]);
    std::vector<std::vector<float>> times(ncases);
    cudaEvent_t start, stop;
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&stop));
    const int calls = 20;
    for (int round = 0; round < 11; round++) {
        for (int k = 0; k < ncases; k++) {
            CHECK(cudaEventRecord(start));
            for (int i = 0; i < calls; i++) {
                const int s = (round * calls + i) % sets;
                const float4* x = reinterpret_cast<const float4*>(xs[s]);
                float4* y = reinterpret_cast<float4*>(ys[s]);
                switch (cases[k].kind) {
                    case 0: CHECK(cudaMemcpyAsync(y, x, bytes, cudaMemcpyDeviceToDevice)); break;
                    case 1: read_sum<4><<<sms * 4, 256>>>(x, n4, sink); break;
                    case 2: read_sum<8><<<sms * 4, 256>>>(x, n4, sink); break;
                    case 3: read_sum<4><<<sms * 8, 256>>>(x, n4, sink); break;
                    case 4: channel_sums<double, 4><<<dim3(C, 8), 256>>>(x, 8, partials); break;
                    case 5: channel_sums<float, 4><<<dim3(C, 8), 256>>>(x, 8, partials); break;
                    case 6: channel_sums<double, 4><<<dim3(C, 16), 256>>>(x, 16, partials); break;
                    case 7: fused<<<2 * C, FUSED_THREADS, fused_smem>>>(x, y, partials, arrivals, ++epoch); break;
                }
            }
            CHECK(cudaEventRecord(stop));
            CHECK(cudaEventSynchronize(stop));
            float ms = 0;
            CHECK(cudaEventElapsedTime(&ms, start, stop));
            times[k].push_back(ms * 1000 / calls);
        }
    }
    CHECK(cudaGetLastError());
    // The fused kernel's output against a host reference (last buffer written).
    {
        const int s = ((10 * calls) + calls - 1) % sets;
        std::vector<float> y(VALUES);
        CHECK(cudaMemcpy(y.data(), ys[s], bytes, cudaMemcpyDeviceToHost));
        double worst = 0;
        for (int c = 0; c < C; c++) {
            double s1 = 0, s2 = 0;
            for (int n = 0; n < N; n++)
                for (int p = 0; p < PLANE; p++) s1 += host[(size_t(n) * C + c) * PLANE + p];
            const double mean = s1 / (double(N) * PLANE);
            for (int n = 0; n < N; n++)
                for (int p = 0; p < PLANE; p++) {
                    const double d = host[(size_t(n) * C + c) * PLANE + p] - mean;
                    s2 += d * d;
                }
            const double invstd = 1 / std::sqrt(s2 / (double(N) * PLANE) + 1e-5);
            for (int n = 0; n < N; n++)
                for (int p = 0; p < PLANE; p++) {
                    const size_t i = (size_t(n) * C + c) * PLANE + p;
                    worst = std::max(worst, std::abs(y[i] - (host[i] - mean) * invstd));
                }
        }
        std::printf("fused kernel: largest error against the float64 reference %.3g\n", worst);
    }
    const double copy = [&] {
        auto t = times[0];
        std::sort(t.begin(), t.end());
        return t[t.size() / 2];
    }();
    std::printf("x (%d, %d, 56, 56) float32, %.1f MB; %d SMs; %d buffers; median of 11 rounds of %d calls\n", N, C,
                bytes / 1e6, sms, sets, calls);
    for (int k = 0; k < ncases; k++) {
        std::sort(times[k].begin(), times[k].end());
        const double t = times[k][times[k].size() / 2];
        std::printf("  %-34s %7.1f us   copy/this %.2f\n", cases[k].name, t, copy / t);
    }
}
