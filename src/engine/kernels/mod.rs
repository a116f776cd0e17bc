//! The native CPU kernels every layer family's native pass is built from: matrix products
//! ([`gemm`]), and f32 math in fixed lanes ([`math`]) so that a result is the same at every
//! SIMD level. They know no layer, model or backend.

pub mod gemm;
pub mod math;
pub mod vector;
