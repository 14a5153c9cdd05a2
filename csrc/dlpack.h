// Minimal DLPack definitions, so the extension needs neither torch nor the dlpack package to build.
//
// These mirror the stable DLPack C ABI (dmlc/dlpack `include/dlpack/dlpack.h`): the unversioned
// `DLManagedTensor` layout of v0.8, carried in a PyCapsule named "dltensor" (renamed "used_dltensor" by the
// consumer), and the v1.0 `DLManagedTensorVersioned` ("dltensor_versioned"), which we hand out only to
// consumers that ask for it through __dlpack__(max_version=(1, ...)): numpy imports legacy capsules
// read-only, versioned ones with flags == 0 writable. Field order and widths must never change.
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

typedef struct {
  uint32_t major;
  uint32_t minor;
} DLPackVersion;

typedef struct DLManagedTensorVersioned {
  DLPackVersion version;
  void* manager_ctx;
  void (*deleter)(struct DLManagedTensorVersioned* self);
  uint64_t flags;  // bit 0: read-only; bit 1: is a copy
  DLTensor dl_tensor;
} DLManagedTensorVersioned;

}  // extern "C"
