// Compile-time proof that the ISA the build asked for is the one at::vec uses: without the CPU_CAPABILITY_*
// macro, Vectorized<float> silently falls back to the generic (scalar-loop) implementation.
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512)
static_assert(at::vec::Vectorized<float>::size() == 16, "SDPAX_CPU_ISA=avx512 but at::vec is not AVX-512");
#elif defined(CPU_CAPABILITY_AVX2)
static_assert(at::vec::Vectorized<float>::size() == 8, "SDPAX_CPU_ISA=avx2 but at::vec is not AVX2");
#endif
