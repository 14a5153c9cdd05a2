// Minimal DLPack definitions, so the extension needs neither torch nor the dlpack package to build.
//
// These mirror the stable DLPack C ABI (dmlc/dlpack `include/dlpack/dlpack.h`, the unversioned
// `DLManagedTensor` layout of v0.8). Consumers (torch.from_dlpack, numpy.from_dlpack) read the struct
// through a PyCapsule named "dltensor" and rename it "used_dltensor" once they own it; field order and
// widths below must therefore never change.
#pragma once

#include <cstdint>

extern "C" {

typedef enum {
  kDLCPU = 1,
  kDLCUDA = 2,
} DLDeviceType;

typedef struct {
  int32_t device_type;  // a DLDeviceType value
  int32_t device_id;
} DLDevice;

typedef enum {
  kDLInt = 0,
  kDLUInt = 1,
  kDLFloat = 2,
} DLDataTypeCode;

typedef struct {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
} DLDataType;

typedef struct {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // NULL means compact row-major
  uint64_t byte_offset;
} DLTensor;

typedef struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(struct DLManagedTensor* self);
} DLManagedTensor;

}  // extern "C"
