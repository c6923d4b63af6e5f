// abi.h — every struct passed by value to a kernel, declared once. The Rust
// mirror is src/cuda/abi.rs (#[repr(C)], with layout tests). Plain C: fixed-width
// integer fields, no padding surprises (order fields largest first).
#pragma once
#ifndef __CUDACC_RTC__
#include <stdint.h>
#endif

// ---- iieu ----------------------------------------------------------------
// Geometry + patch-norm mode of one IIEU-B (kernels/iieu.cu). Built on the host
// from a validated IieuConfig (src/cuda/iieu.rs); every field fits in int32.
typedef struct IieuGeom {
  int32_t n;      // batch N
  int32_t c;      // input channels C (x_pre)
  int32_t h;      // input height H
  int32_t w;      // input width W
  int32_t o;      // output channels O (x, y)
  int32_t oh;     // output height H'
  int32_t ow;     // output width W'
  int32_t kh;     // kernel height KH
  int32_t kw;     // kernel width KW
  int32_t sh;     // stride (vertical)
  int32_t sw;     // stride (horizontal)
  int32_t ph;     // padding (top/bottom)
  int32_t pw;     // padding (left/right)
  int32_t dh;     // dilation of the patch-norm window (vertical; 1 for AllChannels)
  int32_t dw;     // dilation of the patch-norm window (horizontal; 1 for AllChannels)
  int32_t gp;     // patch-norm planes per sample G' (groups, or 1 for AllChannels)
  int32_t c_per;  // input channels per patch plane, C/G'
  int32_t o_per;  // output channels per patch plane, O/G'
  int32_t w_per;  // weight entries per filter, C/g*KH*KW
  int32_t mode;   // 0 = PatchNorm::PerGroup, 1 = PatchNorm::AllChannels (informational)
} IieuGeom;


// ---- iieu_conv -----------------------------------------------------------
// Geometry of one IieuConv2d convolution (kernels/iieu_conv.cu), built on the host
// from a validated IieuConfig (src/cuda/iieu_conv.rs); every field fits in int32.
typedef struct ConvGeom {
  int32_t n;       // batch N
  int32_t c;       // input channels C
  int32_t h;       // input height H
  int32_t w;       // input width W
  int32_t o;       // output channels O
  int32_t oh;      // output height H'
  int32_t ow;      // output width W'
  int32_t kh;      // kernel height KH
  int32_t kw;      // kernel width KW
  int32_t sh;      // stride (vertical)
  int32_t sw;      // stride (horizontal)
  int32_t ph;      // padding (top/bottom)
  int32_t pw;      // padding (left/right)
  int32_t dh;      // conv dilation (vertical)
  int32_t dw;      // conv dilation (horizontal)
  int32_t groups;  // conv groups g
  int32_t cg;      // input channels per group C/g
  int32_t og;      // output channels per group O/g
  int32_t kdim;    // GEMM depth of the forward, C/g*KH*KW
  int32_t mtiles;  // forward pixel tiles per sample, ceil(H'*W'/64)
  int32_t gp;      // patch-norm planes per sample G' (g for PerGroup, 1 for AllChannels)
  int32_t splits;  // weight-gradient reduction chunks (fixed per shape)
} ConvGeom;

// ---- iieu_dc -------------------------------------------------------------


// ---- acon ----------------------------------------------------------------


// ---- aiec ----------------------------------------------------------------


// ---- end ------------------------------------------------------------------
