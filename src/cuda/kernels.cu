// The CUDA kernels of batchnorm. NVRTC compiles this file at run time for the device's own
// architecture (src/cuda/device.rs), once per process and device.
//
// Tensors are (N, C, HW) and C-contiguous. Every kernel exists per storage type and load width:
// `<kernel>_f32x4`, `_f32x1`, `_f64x2`, `_f64x1`, and for float16 and bfloat16 tensors (on float32
// modules: PyTorch's mixed precision) `_f16x8`, `_f16x4`, `_f16x1`, `_bf16x8`, ... (entry points at
// the end). A pack of W values is one load; the wide versions move 16 bytes (8 for x4 halves) and
// run when HW is a multiple of W and the pointers are 16-byte aligned. The reductions group values
// into packs by HW alone, so they also have unaligned wide versions (`_f32x4u`, `_f16x8u`, ...)
// that load packs value by value and give the same bits.
//
// The CPU kernels they must match: the training forward in src/cpu/forward.rs, the backward in
// src/cpu/backward.rs. As there, sums are kept in double with each channel shifted by one of its
// own values, partial results are merged with Chan's formula, and float32 outputs subtract the
// mean as hi + lo, so offset data keeps its digits. Half values widen to float32 as they are loaded
// and the float32 result rounds once to the half type as it is stored, as on the CPU.

typedef unsigned long long u64;

#define THREADS 256  // every launch's block size; src/cuda/launch.rs says the same
#define UNROLL 4     // independent loads each thread has in flight (16-byte ones, in the reductions)
// Blocks of a reduction pass resident on each multiprocessor (so at most 64 registers a thread):
// launch.rs sizes the grid to one wave of them.
#define REDUCTION_BLOCKS_PER_MULTIPROCESSOR 4

// Kernel arguments, one struct per direction; the Rust twins are in src/cuda/launch.rs and every
// field is 8 bytes wide so both sides agree on the layout.
struct ForwardArgs {
    const void* x;
    void* y;
    u64 images, channels, plane;  // N, C, H*W
    // Constants that divide by the plane's packs (in the reductions' and the element-wise passes'
    // widths) and by C with a multiply and a shift (see `divide`); from Divisor in launch.rs.
    u64 reduction_plane_divisor, plane_divisor, channel_divisor;
    u64 splits;                   // blocks per channel in the statistics pass
    void* partials;               // Moments[C * splits]
    unsigned* arrivals;           // [C], zero between calls
    void* coefficients;           // Affine<T>[C], written by the statistics pass
    double* saved_mean;           // [C], what the backward differentiates through
    double* saved_invstd;         // [C]
    void* running_mean;           // T[C] or null
    void* running_var;            // T[C] or null
    const void* weight;           // T[C] or null (affine=False)
    const void* bias;             // T[C] or null
    double factor;                // running-statistics blend: momentum, or 1/(batches + 1)
    double eps;
};

struct BackwardArgs {
    const void* x;
    const void* dy;
    void* dx;
    u64 images, channels, plane;
    u64 reduction_plane_divisor, plane_divisor, channel_divisor;  // as in ForwardArgs
    u64 splits;
    void* partials;       // Sums[C * splits]
    unsigned* arrivals;   // [C], zero between calls
    void* coefficients;   // GradAffine<T>[C]
    const double* saved_mean;
    const double* saved_invstd;
    const void* weight;   // T[C] or null
    void* grad_weight;    // T[C] or null
    void* grad_bias;      // T[C] or null
    u64 from_batch;       // the forward used the batch's statistics, so gradients flow through them
    u64 accumulate;       // add into grad_weight / grad_bias instead of overwriting them
};

// n / d for the 32-bit indices (n < 2^31) as a multiply and a shift (Granlund and Montgomery): a
// hardware division is some twenty instructions, and the passes divide once per pack. `magic`
// holds the multiplier (low 32 bits; 0 when d is 1) and the shift; 64-bit indices divide plainly.
template <typename Index>
__device__ __forceinline__ Index divide(Index n, Index d, u64 magic) {
    if constexpr (sizeof(Index) == 4) {
        const unsigned multiplier = static_cast<unsigned>(magic);
        return multiplier ? __umulhi(n, multiplier) >> static_cast<unsigned>(magic >> 32) : n;
    } else {
        return n / d;
    }
}

// Packs a thread loads per step of a reduction: UNROLL 16-byte loads' worth at any width, so that
// narrow packs (planes such as 7x7 that 16-byte packs do not divide) keep as many bytes in flight,
// up to 16 loads. Half values take a register each once loaded, as floats do, so they load half
// the bytes a step for the same registers (four resident blocks leave 64 a thread).
template <typename T, int W>
__device__ constexpr int step_loads() {
    constexpr int bytes = sizeof(T) == 2 ? UNROLL * 8 : UNROLL * 16;
    constexpr int loads = bytes / static_cast<int>(sizeof(T) * W);
    return loads < 16 ? loads : 16;
}

template <typename T, int W>
struct __align__(sizeof(T) * W) Pack {
    T v[W];
};

// Half storage, as bits: the kernels compute in float32 and convert as they load and store.
struct Float16 {
    unsigned short bits;
};
struct BFloat16 {
    unsigned short bits;
};

// The type a storage type computes in: itself, or float32 for the half types.
template <typename S>
struct ComputeOf {
    typedef S type;
};
template <>
struct ComputeOf<Float16> {
    typedef float type;
};
template <>
struct ComputeOf<BFloat16> {
    typedef float type;
};

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(BFloat16 v) { return __uint_as_float(static_cast<unsigned>(v.bits) << 16); }
__device__ __forceinline__ float widen(Float16 v) {
#if defined(__CUDA_ARCH__)
    float out;
    asm("cvt.f32.f16 %0, %1;" : "=f"(out) : "h"(v.bits));
    return out;
#else
    // Exact: every float16 is a float32 (the emulator's path; the GPU converts in one instruction).
    const unsigned sign = static_cast<unsigned>(v.bits & 0x8000u) << 16;
    const unsigned exponent = (v.bits >> 10) & 0x1fu, mantissa = v.bits & 0x3ffu;
    if (exponent == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0u) return __uint_as_float(sign | __float_as_uint(static_cast<float>(mantissa) * 0x1p-24f));
    return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
#endif
}

template <typename S>
__device__ __forceinline__ unsigned short narrow_half(float v);

template <>
__device__ __forceinline__ unsigned short narrow_half<BFloat16>(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned short out;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(out) : "f"(v));
    return out;
#else
    const unsigned bits = __float_as_uint(v);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((bits >> 16) | 0x40u);
    return static_cast<unsigned short>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
#endif
}

template <>
__device__ __forceinline__ unsigned short narrow_half<Float16>(float v) {
#if defined(__CUDA_ARCH__)
    unsigned short out;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(out) : "f"(v));
    return out;
#else
    const unsigned bits = __float_as_uint(v);
    const unsigned sign = (bits >> 16) & 0x8000u, exponent = (bits >> 23) & 0xffu;
    unsigned mantissa = bits & 0x7fffffu;
    if (exponent == 0xffu) return static_cast<unsigned short>(sign | 0x7c00u | (mantissa ? 0x200u | (mantissa >> 13) : 0u));
    const int e = static_cast<int>(exponent) - 112;  // the float16 exponent field
    if (e >= 0x1f) return static_cast<unsigned short>(sign | 0x7c00u);
    unsigned shift = 13, base = sign | (static_cast<unsigned>(e > 0 ? e : 0) << 10);
    if (e <= 0) {  // a float16 subnormal (or zero): the implicit bit joins the mantissa
        if (e < -10) return static_cast<unsigned short>(sign);
        mantissa |= 0x800000u;
        shift = static_cast<unsigned>(14 - e);
    }
    unsigned out = base + (mantissa >> shift);  // a carry out of the mantissa steps the exponent up
    const unsigned rest = mantissa & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (out & 1u))) out++;
    return static_cast<unsigned short>(out);
#endif
}

// A computed value in storage type S, rounded to nearest, ties to even; NaN stays NaN.
template <typename S>
__device__ __forceinline__ S narrow(typename ComputeOf<S>::type v) {
    if constexpr (sizeof(S) == 2) {
        S out;
        out.bits = narrow_half<S>(v);
        return out;
    } else {
        return v;
    }
}

// x - mean as (x - hi) - lo: exact for x near the mean, where a single float mean would round.
template <typename T>
struct Affine {
    T mean_hi, mean_lo, scale, shift;  // y = ((x - hi) - lo) * scale + shift
};

template <typename T>
struct GradAffine {
    T mean_hi, mean_lo, k_dy, k_x, k_one;  // dx = dy * k_dy + ((x - hi) - lo) * k_x + k_one
};

struct Moments {
    double count, mean, m2;
};

struct Sums {
    double dy, dy_xmu;
};

// Σ (x − shift) and Σ (x − shift)² over values that share one shift: a block's threads add these
// (no division), and only the block's total becomes Moments, which blocks combine with Chan.
struct ShiftedSums {
    double s1, s2;
};

__device__ __forceinline__ Moments combine(Moments a, Moments b) {
    double count = a.count + b.count;
    if (count == 0.0) return a;
    double delta = b.mean - a.mean;
    double share = b.count / count;
    return Moments{count, a.mean + delta * share, a.m2 + b.m2 + delta * delta * a.count * share};
}

__device__ __forceinline__ Sums combine(Sums a, Sums b) { return Sums{a.dy + b.dy, a.dy_xmu + b.dy_xmu}; }

__device__ __forceinline__ ShiftedSums combine(ShiftedSums a, ShiftedSums b) {
    return ShiftedSums{a.s1 + b.s1, a.s2 + b.s2};
}

__device__ __forceinline__ Moments shuffle_down(Moments m, int offset) {
    return Moments{__shfl_down_sync(0xffffffffu, m.count, offset), __shfl_down_sync(0xffffffffu, m.mean, offset),
                   __shfl_down_sync(0xffffffffu, m.m2, offset)};
}

__device__ __forceinline__ Sums shuffle_down(Sums s, int offset) {
    return Sums{__shfl_down_sync(0xffffffffu, s.dy, offset), __shfl_down_sync(0xffffffffu, s.dy_xmu, offset)};
}

__device__ __forceinline__ ShiftedSums shuffle_down(ShiftedSums s, int offset) {
    return ShiftedSums{__shfl_down_sync(0xffffffffu, s.s1, offset), __shfl_down_sync(0xffffffffu, s.s2, offset)};
}

// The whole block's combination of `value`, valid in thread 0.
template <typename S>
__device__ S block_combine(S value) {
    __shared__ S per_warp[THREADS / 32];
    __syncthreads();  // a previous call may still be reading per_warp
    for (int offset = 16; offset > 0; offset /= 2) value = combine(value, shuffle_down(value, offset));
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) per_warp[warp] = value;
    __syncthreads();
    if (warp == 0) {
        value = lane < THREADS / 32 ? per_warp[lane] : S{};
        for (int offset = 16; offset > 0; offset /= 2) value = combine(value, shuffle_down(value, offset));
    }
    return value;
}

// Publishes this block's partial for channel c and reports whether it was the channel's last:
// that block alone goes on to combine all partials (no second launch, no host round trip).
template <typename S>
__device__ bool publish_partial(S partial, S* partials, unsigned* arrivals, unsigned c, unsigned split, u64 splits) {
    __shared__ bool last;
    if (threadIdx.x == 0) {
        partials[c * splits + split] = partial;
        __threadfence();
        last = atomicAdd(&arrivals[c], 1u) == splits - 1;
    }
    __syncthreads();
    return last;
}

// Other blocks' partials, read from L2 (.cg), where they are, never from a stale L1 line.
__device__ __forceinline__ Moments load_from_l2(const Moments* p) {
    return Moments{__ldcg(&p->count), __ldcg(&p->mean), __ldcg(&p->m2)};
}

__device__ __forceinline__ Sums load_from_l2(const Sums* p) { return Sums{__ldcg(&p->dy), __ldcg(&p->dy_xmu)}; }

// Channel c's partials, combined by the first warp of the last block to arrive (valid in thread
// 0; the other warps have no part in it, nor the cost of Chan's divisions); resets the count.
template <typename S>
__device__ S gather_partials(S* partials, unsigned* arrivals, unsigned c, u64 splits) {
    __threadfence();
    S total{};
    if (threadIdx.x < 32) {
        for (u64 i = threadIdx.x; i < splits; i += 32) total = combine(total, load_from_l2(&partials[c * splits + i]));
        for (int offset = 16; offset > 0; offset /= 2) total = combine(total, shuffle_down(total, offset));
    }
    if (threadIdx.x == 0) arrivals[c] = 0;
    return total;
}

// Turns a block's `value` for channel c into the channel's total (valid in thread 0) and returns
// true in the one block that then has it: a lone block has it already (no atomics, no partials);
// of several, the last to arrive gathers them all.
template <typename S>
__device__ bool channel_total(S& value, S* partials, unsigned* arrivals, unsigned c, unsigned split, u64 splits) {
    if (splits == 1) return true;
    if (!publish_partial(value, partials, arrivals, c, split, splits)) return false;
    value = gather_partials(partials, arrivals, c, splits);
    return true;
}

// The packs of channel c that block `split` of a reduction pass covers: an equal share of its
// N * HW / W packs, in (image, offset) order.
template <typename Index>
struct SplitRange {
    Index begin, end;
};

template <int W, typename Index>
__device__ __forceinline__ SplitRange<Index> split_range(u64 images, u64 plane, u64 splits, unsigned split) {
    const Index count = static_cast<Index>(images * (plane / W));
    const Index per_split = static_cast<Index>((count + splits - 1) / splits);
    const Index begin = split * per_split;
    return SplitRange<Index>{begin, min(count, begin + per_split)};
}

// This thread's first pack in an elementwise pass: THREADS * UNROLL packs per block, the tiles in
// reverse order, as pass 1 read the tensor front to back and the end of it is what L2 still holds.
template <typename Index>
__device__ __forceinline__ Index tile_first() {
    const Index tile = gridDim.x - 1 - blockIdx.x;
    return tile * (THREADS * UNROLL) + threadIdx.x;
}

// Channel c's packs, addressed 0 .. N * HW / W in (image, offset) order. Unaligned, a pack is
// loaded value by value: the reductions group values into packs by the plane alone, so an array's
// address never changes which thread sums which value, nor a bit of the result.
template <typename T, int W, typename Index, bool ALIGNED>
struct ChannelWalk {
    const T* base;  // first value of channel c in image 0
    Index plane_packs;
    u64 image_stride;  // C * HW values
    u64 plane_divisor;  // divides by plane_packs (see `divide`)
    __device__ __forceinline__ Pack<T, W> load(Index k) const {
        Index image = divide<Index>(k, plane_packs, plane_divisor);
        Index at = k - image * plane_packs;
        if constexpr (ALIGNED) {
            return reinterpret_cast<const Pack<T, W>*>(base + image * image_stride)[at];
        } else {
            Pack<T, W> pack;
            const T* values = base + image * image_stride + static_cast<u64>(at) * W;
#pragma unroll
            for (int e = 0; e < W; e++) pack.v[e] = values[e];
            return pack;
        }
    }
    // The packs first, first + THREADS, ... of a thread's next step, those before `end`.
    template <int LOADS>
    __device__ __forceinline__ void load_step(Pack<T, W> (&packs)[LOADS], Index first, Index end) const {
#pragma unroll
        for (int u = 0; u < LOADS; u++)
            if (first + u * THREADS < end) packs[u] = load(first + u * THREADS);
    }
};

template <typename T>
__device__ __forceinline__ T weight_or_one(const void* weight, unsigned c) {
    return weight ? static_cast<const T*>(weight)[c] : T(1);
}

// Pass 1 of the training forward: block (c, split) reduces its share of channel c to moments;
// the channel's last block combines the partials, writes the mean and 1/std the backward needs,
// the coefficients of pass 2, and blends the running statistics.
template <typename S, int W, typename Index, bool ALIGNED>
__device__ void statistics(const ForwardArgs& a) {
    typedef typename ComputeOf<S>::type T;
    const unsigned c = blockIdx.x, split = blockIdx.y;
    const SplitRange<Index> range = split_range<W, Index>(a.images, a.plane, a.splits, split);
    const Index begin = range.begin, end = range.end;
    const ChannelWalk<S, W, Index, ALIGNED> walk{static_cast<const S*>(a.x) + c * a.plane,
                                                 static_cast<Index>(a.plane / W), a.channels * a.plane,
                                                 a.reduction_plane_divisor};
    // Each step's loads are issued before the previous step's values are summed, and the first
    // step's before the shift is read: no thread waits for memory with nothing in flight.
    constexpr int LOADS = step_loads<S, W>();
    Index first = begin + threadIdx.x;
    Pack<S, W> packs[LOADS];
    walk.load_step(packs, first, end);
    const double shift = static_cast<double>(widen(walk.base[0]));
    double s1 = 0.0, s2 = 0.0;
    for (; first < end; first += THREADS * LOADS) {
        Pack<S, W> next[LOADS];
        walk.load_step(next, first + THREADS * LOADS, end);
#pragma unroll
        for (int u = 0; u < LOADS; u++) {
            if (first + u * THREADS < end) {
#pragma unroll
                for (int e = 0; e < W; e++) {
                    const double d = static_cast<double>(widen(packs[u].v[e])) - shift;
                    s1 += d;
                    s2 = fma(d, d, s2);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < LOADS; u++) packs[u] = next[u];
    }
    const ShiftedSums sums = block_combine(ShiftedSums{s1, s2});
    // The block's moments (in thread 0, the one that publishes them). Rounding below zero is
    // clamped, but NaN kept (fmax would drop it): NaN input reaches the statistics.
    const double n = static_cast<double>(end > begin ? end - begin : 0) * W;
    const double m2 = sums.s2 - sums.s1 * (sums.s1 / n);
    const Moments own = n > 0.0 ? Moments{n, shift + sums.s1 / n, m2 < 0.0 ? 0.0 : m2} : Moments{};
    Moments m = own;
    if (!channel_total(m, static_cast<Moments*>(a.partials), a.arrivals, c, split, a.splits)) return;
    if (threadIdx.x != 0) return;

    const double mean = m.mean, var = m.m2 / m.count;
    const double invstd = 1.0 / sqrt(var + a.eps);
    a.saved_mean[c] = mean;
    a.saved_invstd[c] = invstd;
    const T hi = static_cast<T>(mean);
    const double scale = invstd * static_cast<double>(weight_or_one<T>(a.weight, c));
    const T shift_out = a.bias ? static_cast<const T*>(a.bias)[c] : T(0);
    static_cast<Affine<T>*>(a.coefficients)[c] =
        Affine<T>{hi, static_cast<T>(mean - static_cast<double>(hi)), static_cast<T>(scale), shift_out};
    if (a.running_mean) {
        T* running_mean = static_cast<T*>(a.running_mean);
        T* running_var = static_cast<T*>(a.running_var);
        const double unbiased = m.m2 / (m.count - 1.0);
        running_mean[c] = static_cast<T>((1.0 - a.factor) * static_cast<double>(running_mean[c]) + a.factor * mean);
        running_var[c] = static_cast<T>((1.0 - a.factor) * static_cast<double>(running_var[c]) + a.factor * unbiased);
    }
}

// The coefficients of an eval forward, from the running statistics, one thread per channel;
// also kept as the statistics the backward differentiates with (as constants).
template <typename T>
__device__ void eval_coefficients(const ForwardArgs& a) {
    const u64 c = blockIdx.x * (u64)THREADS + threadIdx.x;
    if (c >= a.channels) return;
    const double mean = static_cast<double>(static_cast<const T*>(a.running_mean)[c]);
    const double invstd = 1.0 / sqrt(static_cast<double>(static_cast<const T*>(a.running_var)[c]) + a.eps);
    a.saved_mean[c] = mean;
    a.saved_invstd[c] = invstd;
    const T hi = static_cast<T>(mean);
    const double scale = invstd * static_cast<double>(weight_or_one<T>(a.weight, c));
    const T shift_out = a.bias ? static_cast<const T*>(a.bias)[c] : T(0);
    static_cast<Affine<T>*>(a.coefficients)[c] =
        Affine<T>{hi, static_cast<T>(mean - static_cast<double>(hi)), static_cast<T>(scale), shift_out};
}

// The channel of pack i of the flat (N, C, HW / W) tensor: (i / plane_packs) % C.
template <typename Index, typename Args>
__device__ __forceinline__ Index channel_of(Index i, Index plane_packs, const Args& a) {
    const Index plane = divide<Index>(i, plane_packs, a.plane_divisor);
    const Index channels = static_cast<Index>(a.channels);
    return plane - divide<Index>(plane, channels, a.channel_divisor) * channels;
}

// Loads that are the value's last use: evict-first, so they leave L2 to data still to be read.
template <typename P>
__device__ __forceinline__ P load_last_use(const P* p) {
    P out;
    if constexpr (sizeof(P) == 16) {
        float4 raw = __ldcs(reinterpret_cast<const float4*>(p));
        out = *reinterpret_cast<P*>(&raw);
    } else if constexpr (sizeof(P) == 8) {
        double raw = __ldcs(reinterpret_cast<const double*>(p));
        out = *reinterpret_cast<P*>(&raw);
    } else if constexpr (sizeof(P) == 4) {
        float raw = __ldcs(reinterpret_cast<const float*>(p));
        out = *reinterpret_cast<P*>(&raw);
    } else {
        unsigned short raw = __ldcs(reinterpret_cast<const unsigned short*>(p));
        out = *reinterpret_cast<P*>(&raw);
    }
    return out;
}

template <typename P>
__device__ __forceinline__ void store_streaming(P* p, P value) {
    if constexpr (sizeof(P) == 16) {
        __stcs(reinterpret_cast<float4*>(p), *reinterpret_cast<float4*>(&value));
    } else if constexpr (sizeof(P) == 8) {
        __stcs(reinterpret_cast<double*>(p), *reinterpret_cast<double*>(&value));
    } else if constexpr (sizeof(P) == 4) {
        __stcs(reinterpret_cast<float*>(p), *reinterpret_cast<float*>(&value));
    } else {
        __stcs(reinterpret_cast<unsigned short*>(p), *reinterpret_cast<unsigned short*>(&value));
    }
}

// Pass 2 of the forward (and all of eval): y = ((x - hi) - lo) * scale + shift over the flat
// tensor, by tiles (see tile_first).
template <typename S, int W, typename Index>
__device__ void normalize(const ForwardArgs& a) {
    typedef typename ComputeOf<S>::type T;
    typedef Pack<S, W> P;
    const Index plane_packs = static_cast<Index>(a.plane / W);
    const Index total = static_cast<Index>(a.images * a.channels) * plane_packs;
    const Index first = tile_first<Index>();
    const P* x = static_cast<const P*>(a.x);
    P* y = static_cast<P*>(a.y);
    const Affine<T>* coefficients = static_cast<const Affine<T>*>(a.coefficients);
    P packs[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; u++)
        if (first + u * THREADS < total) packs[u] = load_last_use(x + first + u * THREADS);
#pragma unroll
    for (int u = 0; u < UNROLL; u++) {
        const Index i = first + u * THREADS;
        if (i < total) {
            const Affine<T> k = coefficients[channel_of(i, plane_packs, a)];
            P out;
#pragma unroll
            for (int e = 0; e < W; e++)
                out.v[e] = narrow<S>(((widen(packs[u].v[e]) - k.mean_hi) - k.mean_lo) * k.scale + k.shift);
            store_streaming(y + i, out);
        }
    }
}

// Pass 1 of the backward: Σ dy and Σ dy·(x − mean) per channel, both reductions in one read of
// x and dy; the last block per channel writes grad_weight, grad_bias and pass 2's coefficients.
template <typename S, int W, typename Index, bool ALIGNED>
__device__ void gradient_sums(const BackwardArgs& a) {
    typedef typename ComputeOf<S>::type T;
    const unsigned c = blockIdx.x, split = blockIdx.y;
    const SplitRange<Index> range = split_range<W, Index>(a.images, a.plane, a.splits, split);
    const Index begin = range.begin, end = range.end;
    const Index plane_packs = static_cast<Index>(a.plane / W);
    const ChannelWalk<S, W, Index, ALIGNED> xs{static_cast<const S*>(a.x) + c * a.plane, plane_packs,
                                               a.channels * a.plane, a.reduction_plane_divisor};
    const ChannelWalk<S, W, Index, ALIGNED> dys{static_cast<const S*>(a.dy) + c * a.plane, plane_packs,
                                                a.channels * a.plane, a.reduction_plane_divisor};
    const double mean = a.saved_mean[c];
    Sums own{0.0, 0.0};
    // Two arrays' loads in flight already; loading a step ahead as `statistics` does would need
    // more registers than four resident blocks leave. Of each array, half `statistics`' loads (at
    // least UNROLL), so that narrow packs' 64-bit addresses still fit those registers; eight-value
    // half packs, two (unaligned, they load a value to a register: 32 of them a step).
    constexpr int LOADS = sizeof(S) == 2 && W == 8 ? 2 : step_loads<S, W>() / 2 > UNROLL ? step_loads<S, W>() / 2 : UNROLL;
    for (Index first = begin + threadIdx.x; first < end; first += THREADS * LOADS) {
        Pack<S, W> x_packs[LOADS], dy_packs[LOADS];
        xs.load_step(x_packs, first, end);
        dys.load_step(dy_packs, first, end);
#pragma unroll
        for (int u = 0; u < LOADS; u++) {
            if (first + u * THREADS < end) {
#pragma unroll
                for (int e = 0; e < W; e++) {
                    const double dy = static_cast<double>(widen(dy_packs[u].v[e]));
                    own.dy += dy;
                    own.dy_xmu = fma(dy, static_cast<double>(widen(x_packs[u].v[e])) - mean, own.dy_xmu);
                }
            }
        }
    }
    Sums s = block_combine(own);
    if (!channel_total(s, static_cast<Sums*>(a.partials), a.arrivals, c, split, a.splits)) return;
    if (threadIdx.x != 0) return;

    const double invstd = a.saved_invstd[c];
    // As the CPU: each gradient rounds to T, then adds to what is there in double.
    const T grad_weight = static_cast<T>(s.dy_xmu * invstd);
    const T grad_bias = static_cast<T>(s.dy);
    if (a.grad_weight) {
        T* g = static_cast<T*>(a.grad_weight);
        g[c] = a.accumulate ? static_cast<T>(static_cast<double>(g[c]) + static_cast<double>(grad_weight)) : grad_weight;
    }
    if (a.grad_bias) {
        T* g = static_cast<T*>(a.grad_bias);
        g[c] = a.accumulate ? static_cast<T>(static_cast<double>(g[c]) + static_cast<double>(grad_bias)) : grad_bias;
    }
    const double k_dy = invstd * static_cast<double>(weight_or_one<T>(a.weight, c));
    double k_x = 0.0, k_one = 0.0;
    if (a.from_batch) {
        const double values = static_cast<double>(a.images * a.plane);
        k_x = -k_dy * invstd * invstd * s.dy_xmu / values;
        k_one = -k_dy * s.dy / values;
    }
    const T hi = static_cast<T>(mean);
    static_cast<GradAffine<T>*>(a.coefficients)[c] = GradAffine<T>{
        hi, static_cast<T>(mean - static_cast<double>(hi)), static_cast<T>(k_dy), static_cast<T>(k_x),
        static_cast<T>(k_one)};
}

// Pass 2 of the backward: dx = dy * k_dy + ((x - hi) - lo) * k_x + k_one, flat, as normalize.
template <typename S, int W, typename Index>
__device__ void input_gradient(const BackwardArgs& a) {
    typedef typename ComputeOf<S>::type T;
    typedef Pack<S, W> P;
    const Index plane_packs = static_cast<Index>(a.plane / W);
    const Index total = static_cast<Index>(a.images * a.channels) * plane_packs;
    const Index first = tile_first<Index>();
    const P* x = static_cast<const P*>(a.x);
    const P* dy = static_cast<const P*>(a.dy);
    P* dx = static_cast<P*>(a.dx);
    const GradAffine<T>* coefficients = static_cast<const GradAffine<T>*>(a.coefficients);
    P x_packs[UNROLL], dy_packs[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; u++) {
        if (first + u * THREADS < total) {
            x_packs[u] = load_last_use(x + first + u * THREADS);
            dy_packs[u] = load_last_use(dy + first + u * THREADS);
        }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; u++) {
        const Index i = first + u * THREADS;
        if (i < total) {
            const GradAffine<T> k = coefficients[channel_of(i, plane_packs, a)];
            P out;
#pragma unroll
            for (int e = 0; e < W; e++)
                out.v[e] = narrow<S>(widen(dy_packs[u].v[e]) * k.k_dy +
                                     ((widen(x_packs[u].v[e]) - k.mean_hi) - k.mean_lo) * k.k_x + k.k_one);
            store_streaming(dx + i, out);
        }
    }
}

// 32-bit index arithmetic whenever the tensor allows: below 2^31, where `divide` is exact. The
// margins cover the indices a thread forms past its last pack (a step ahead, in the reductions).
#define INDEXED(body, wide_count, T, W) \
    if ((wide_count) <= 0x7fffffffull) body<T, W, unsigned>(a); else body<T, W, u64>(a);
#define REDUCTION_INDEXED(body, wide_count, T, W, ALIGNED) \
    if ((wide_count) <= 0x7fffffffull) body<T, W, unsigned, ALIGNED>(a); else body<T, W, u64, ALIGNED>(a);

// The reductions of width W, for pointers that are (SUFFIX) and are not (SUFFIX##u) 16-byte aligned.
#define REDUCTIONS(T, W, SUFFIX, ALIGNED)                                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS, REDUCTION_BLOCKS_PER_MULTIPROCESSOR)                \
        statistics_##SUFFIX(ForwardArgs a) {                                                               \
        REDUCTION_INDEXED(statistics, a.images * (a.plane / W) + 2 * THREADS * (step_loads<T, W>()), T, W, ALIGNED) \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS, REDUCTION_BLOCKS_PER_MULTIPROCESSOR)                \
        gradient_sums_##SUFFIX(BackwardArgs a) {                                                           \
        REDUCTION_INDEXED(gradient_sums, a.images * (a.plane / W) + THREADS * (step_loads<T, W>()), T, W, ALIGNED) \
    }

#define ELEMENTWISE(T, W, SUFFIX)                                                                          \
    extern "C" __global__ void __launch_bounds__(THREADS) normalize_##SUFFIX(ForwardArgs a) {             \
        INDEXED(normalize, a.images * a.channels * (a.plane / W) + THREADS * UNROLL, T, W)                 \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS) input_gradient_##SUFFIX(BackwardArgs a) {       \
        INDEXED(input_gradient, a.images * a.channels * (a.plane / W) + THREADS * UNROLL, T, W)            \
    }

REDUCTIONS(float, 4, f32x4, true)
REDUCTIONS(float, 4, f32x4u, false)
REDUCTIONS(float, 1, f32x1, true)
REDUCTIONS(double, 2, f64x2, true)
REDUCTIONS(double, 2, f64x2u, false)
REDUCTIONS(double, 1, f64x1, true)
REDUCTIONS(Float16, 8, f16x8, true)
REDUCTIONS(Float16, 8, f16x8u, false)
REDUCTIONS(Float16, 4, f16x4, true)
REDUCTIONS(Float16, 4, f16x4u, false)
REDUCTIONS(Float16, 1, f16x1, true)
REDUCTIONS(BFloat16, 8, bf16x8, true)
REDUCTIONS(BFloat16, 8, bf16x8u, false)
REDUCTIONS(BFloat16, 4, bf16x4, true)
REDUCTIONS(BFloat16, 4, bf16x4u, false)
REDUCTIONS(BFloat16, 1, bf16x1, true)
ELEMENTWISE(float, 4, f32x4)
ELEMENTWISE(float, 1, f32x1)
ELEMENTWISE(double, 2, f64x2)
ELEMENTWISE(double, 1, f64x1)
ELEMENTWISE(Float16, 8, f16x8)
ELEMENTWISE(Float16, 4, f16x4)
ELEMENTWISE(Float16, 1, f16x1)
ELEMENTWISE(BFloat16, 8, bf16x8)
ELEMENTWISE(BFloat16, 4, bf16x4)
ELEMENTWISE(BFloat16, 1, bf16x1)

extern "C" __global__ void __launch_bounds__(THREADS) eval_coefficients_f32(ForwardArgs a) { eval_coefficients<float>(a); }
extern "C" __global__ void __launch_bounds__(THREADS) eval_coefficients_f64(ForwardArgs a) { eval_coefficients<double>(a); }
