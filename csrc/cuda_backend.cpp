// CUDA backend: device memory through the driver's virtual memory management API
// (cuMemAddressReserve / cuMemCreate / cuMemMap / cuMemSetAccess), with a pool of physical handles.
//
// Physical memory on a GPU cannot be shared between processes without exporting handles, so here the
// shared state only RECORDS which pages are committed; each process's view holds its own handles and
// sync() makes them match (cuMemCreate + cuMemMap, or cuMemUnmap). map() in a process commits in that
// process. commit()/decommit() are therefore no-ops and all work happens in view_map()/view_unmap().
//
// Unmapped addresses stay unmapped (no zero page behind them). The allocator guarantees that only pages
// holding live blocks are read (the engine's null/padding block sits on a page that stays mapped), so an
// access to an unmapped page is a bug; an illegal-address fault surfaces it, where a zero page would hide
// it and cost a mapping per page.
#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <mutex>
#include <stdexcept>

#include "cuda_driver.h"
#include "errors.h"
#include "region.h"

namespace kvcached {
namespace cu {

namespace {

struct Loaded {
  Driver d{};
  bool ok = false;
  std::string why;
};

template <class T>
bool resolve(void* lib, T& fn, const char* name, std::string& why) {
  fn = reinterpret_cast<T>(dlsym(lib, name));
  if (!fn) why = std::string("libcuda.so.1 lacks ") + name + ": update the NVIDIA driver";
  return fn != nullptr;
}

const Loaded& load() {
  static Loaded l = [] {
    Loaded out;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* e = dlerror();
      out.why = std::string("cannot load libcuda.so.1 (") + (e ? e : "unknown error") +
                "): install the NVIDIA driver, or use backend='host'";
      return out;
    }
    Driver& d = out.d;
    bool ok = resolve(lib, d.cuInit, "cuInit", out.why) && resolve(lib, d.cuDeviceGetCount, "cuDeviceGetCount", out.why) &&
              resolve(lib, d.cuDeviceGet, "cuDeviceGet", out.why) &&
              resolve(lib, d.cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", out.why) &&
              resolve(lib, d.cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2", out.why) &&
              resolve(lib, d.cuCtxGetCurrent, "cuCtxGetCurrent", out.why) &&
              resolve(lib, d.cuCtxSetCurrent, "cuCtxSetCurrent", out.why) &&
              resolve(lib, d.cuCtxSynchronize, "cuCtxSynchronize", out.why) &&
              resolve(lib, d.cuMemGetInfo, "cuMemGetInfo_v2", out.why) &&
              resolve(lib, d.cuMemGetAllocationGranularity, "cuMemGetAllocationGranularity", out.why) &&
              resolve(lib, d.cuMemAddressReserve, "cuMemAddressReserve", out.why) &&
              resolve(lib, d.cuMemAddressFree, "cuMemAddressFree", out.why) &&
              resolve(lib, d.cuMemCreate, "cuMemCreate", out.why) && resolve(lib, d.cuMemRelease, "cuMemRelease", out.why) &&
              resolve(lib, d.cuMemMap, "cuMemMap", out.why) && resolve(lib, d.cuMemUnmap, "cuMemUnmap", out.why) &&
              resolve(lib, d.cuMemSetAccess, "cuMemSetAccess", out.why) &&
              resolve(lib, d.cuGetErrorName, "cuGetErrorName", out.why) &&
              resolve(lib, d.cuGetErrorString, "cuGetErrorString", out.why);
    if (!ok) return out;
    const CUresult r = d.cuInit(0);
    if (r != CUDA_SUCCESS) {
      const char* name = nullptr;
      d.cuGetErrorName(r, &name);
      out.why = std::string("cuInit failed (") + (name ? name : "unknown") + "): check the driver and GPU visibility";
      return out;
    }
    out.ok = true;
    return out;
  }();
  return l;
}

}  // namespace

const Driver* driver(std::string* why) {
  const Loaded& l = load();
  if (!l.ok && why) *why = l.why;
  return l.ok ? &l.d : nullptr;
}

void check(CUresult r, const char* call) {
  if (r == CUDA_SUCCESS) return;
  const Driver* d = driver();
  const char* name = nullptr;
  const char* text = nullptr;
  if (d) {
    d->cuGetErrorName(r, &name);
    d->cuGetErrorString(r, &text);
  }
  const std::string msg = std::string(call) + " failed: " + (name ? name : "CUDA error " + std::to_string(r)) +
                          (text ? std::string(" (") + text + ")" : std::string());
  if (r == CUDA_ERROR_OUT_OF_MEMORY) throw OutOfMemory(msg);
  throw CudaError(msg);
}

CUmemAllocationProp device_prop(int device) {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  return prop;
}

}  // namespace cu

namespace {

const cu::Driver& require_driver() {
  std::string why;
  const cu::Driver* d = cu::driver(&why);
  if (!d) throw CudaError("CUDA backend unavailable: " + why);
  return *d;
}

// The device's primary context, retained once per process and kept: it is the context the CUDA runtime
// (and so torch) uses, so memory mapped here is visible to torch kernels. Never released, as the runtime
// does, because a release to refcount zero would tear down torch's context too.
cu::CUcontext primary_context(int device) {
  static std::mutex mu;
  static std::array<cu::CUcontext, 64> contexts{};
  const cu::Driver& d = require_driver();
  int count = 0;
  cu::check(d.cuDeviceGetCount(&count), "cuDeviceGetCount");
  if (device < 0 || device >= count || device >= static_cast<int>(contexts.size())) {
    throw std::invalid_argument("CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(count) +
                                " visible): pick 0.." + std::to_string(count - 1));
  }
  std::lock_guard<std::mutex> g(mu);
  if (!contexts[device]) {
    cu::CUdevice dev = 0;
    cu::check(d.cuDeviceGet(&dev, device), "cuDeviceGet");
    cu::check(d.cuDevicePrimaryCtxRetain(&contexts[device], dev), "cuDevicePrimaryCtxRetain");
  }
  return contexts[device];
}

// Makes the device's primary context current on the calling thread: the context is per thread, and the
// bindings call us from whichever Python thread asked.
// Makes the device's primary context current for one region call and puts back whatever context the calling
// thread had before (vLLM's, torch's, or none), so kvcached never changes a thread's CUDA state behind its back.
class DeviceScope {
 public:
  explicit DeviceScope(int device) : d_(require_driver()) {
    cu::check(d_.cuCtxGetCurrent(&previous_), "cuCtxGetCurrent");
    const cu::CUcontext wanted = primary_context(device);
    if (wanted != previous_) {
      cu::check(d_.cuCtxSetCurrent(wanted), "cuCtxSetCurrent");
      restore_ = true;
    }
  }
  ~DeviceScope() {
    if (restore_) d_.cuCtxSetCurrent(previous_);  // best effort: a destructor must not throw
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  const cu::Driver& d_;
  cu::CUcontext previous_ = nullptr;
  bool restore_ = false;
};

// Rollback must not let a second failure hide the first: the caller rethrows the original error.
template <class F>
void quietly(F&& f) {
  try {
    f();
  } catch (...) {
  }
}

class CudaRegion final : public Region {
 public:
  CudaRegion(size_t size, size_t page_size, int device, const std::optional<std::string>& path)
      : Region(size, page_size, device, path), d_(require_driver()), handles_(size / page_size, 0) {
    DeviceScope scope(device);
    const size_t gran = cuda_granularity(device);
    if (page_size % gran != 0) {
      throw std::invalid_argument("page_size " + std::to_string(page_size) +
                                  " must be a multiple of the CUDA allocation granularity " + std::to_string(gran) +
                                  " of device " + std::to_string(device));
    }
    state_ = std::make_unique<SharedState>(path ? path->c_str() : nullptr, Backend::Cuda, size, page_size, 0);
    const bool pow2 = (page_size & (page_size - 1)) == 0;
    cu::CUdeviceptr base = 0;
    cu::check(d_.cuMemAddressReserve(&base, size, pow2 ? page_size : gran, 0, 0), "cuMemAddressReserve");
    address_ = static_cast<uintptr_t>(base);
    try {
      sync();
    } catch (...) {
      release_all();
      throw;
    }
  }

  ~CudaRegion() override {
    try {
      release_all();
    } catch (...) {
      // A destructor cannot report; the driver reclaims everything at process exit anyway.
    }
  }

  const char* backend_name() const override { return "cuda"; }
  int dlpack_device_type() const override { return 2; /* kDLCUDA */ }

  std::vector<int64_t> resident_pages() override {
    std::lock_guard<std::mutex> g(mu_);
    std::vector<int64_t> out;
    for (size_t p = 0; p < handles_.size(); ++p) {
      if (handles_[p]) out.push_back(static_cast<int64_t>(p));
    }
    return out;
  }

  // Nothing strays on a GPU: an unmapped page cannot be committed by an access (it faults instead).
  size_t sweep() override { return 0; }

  size_t backing_bytes() override {
    std::lock_guard<std::mutex> g(mu_);
    size_t n = pool_.size();
    for (auto h : handles_) n += h ? 1 : 0;
    return n * page_size_;
  }

  size_t pool_size() override {
    std::lock_guard<std::mutex> g(mu_);
    return pool_.size();
  }

  size_t trim_pool(size_t keep) override {
    std::lock_guard<std::mutex> g(mu_);
    DeviceScope scope(device_);
    return trim_locked(keep);
  }

  void set_pool_limit(size_t n) override {
    std::lock_guard<std::mutex> g(mu_);
    pool_limit_ = n;
    DeviceScope scope(device_);
    trim_locked(n);
  }

 protected:
  void commit(const PageRun&) override {}
  void decommit(const PageRun&) override {}

  void view_map(const PageRun& r) override {
    DeviceScope scope(device_);
    size_t done = 0;
    try {
      for (; done < r.count; ++done) {
        const size_t p = r.first + done;
        cu::CUmemGenericAllocationHandle h = take_handle();
        const cu::CUresult res = d_.cuMemMap(page_addr(p), page_size_, 0, h, 0);
        if (res != cu::CUDA_SUCCESS) {
          quietly([&] { give_handle(h); });
          cu::check(res, "cuMemMap");
        }
        handles_[p] = h;
      }
      // One access call per run, not per page: it is the expensive part of mapping.
      cu::CUmemAccessDesc access{};
      access.location.type = cu::CU_MEM_LOCATION_TYPE_DEVICE;
      access.location.id = device_;
      access.flags = cu::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
      cu::check(d_.cuMemSetAccess(page_addr(r.first), r.count * page_size_, &access, 1), "cuMemSetAccess");
    } catch (...) {
      for (size_t i = 0; i < done; ++i) quietly([&] { unmap_page(r.first + i); });
      throw;
    }
  }

  void view_unmap(const PageRun& r) override {
    DeviceScope scope(device_);
    for (size_t p = r.first; p < r.first + r.count; ++p) unmap_page(p);
  }

  // Kernels still queued may read pages about to be unmapped: wait for them before the memory goes. Once per
  // batch: a logical page spans a run in every layer's slice, and a sync per run cost the GPU a drain each.
  void quiesce() override {
    DeviceScope scope(device_);
    cu::check(d_.cuCtxSynchronize(), "cuCtxSynchronize");
  }

 private:
  cu::CUdeviceptr page_addr(size_t p) const { return static_cast<cu::CUdeviceptr>(address_ + p * page_size_); }

  cu::CUmemGenericAllocationHandle take_handle() {
    if (!pool_.empty()) {
      auto h = pool_.back();
      pool_.pop_back();
      return h;
    }
    const cu::CUmemAllocationProp prop = cu::device_prop(device_);
    cu::CUmemGenericAllocationHandle h = 0;
    cu::check(d_.cuMemCreate(&h, page_size_, &prop, 0), "cuMemCreate");
    return h;
  }

  // Keeps the handle for the next map (skipping cuMemCreate) while the pool is under its limit.
  void give_handle(cu::CUmemGenericAllocationHandle h) {
    if (pool_.size() < pool_limit_) {
      pool_.push_back(h);
    } else {
      cu::check(d_.cuMemRelease(h), "cuMemRelease");
    }
  }

  void unmap_page(size_t p) {
    if (!handles_[p]) return;
    cu::check(d_.cuMemUnmap(page_addr(p), page_size_), "cuMemUnmap");
    const auto h = handles_[p];
    handles_[p] = 0;
    give_handle(h);
  }

  size_t trim_locked(size_t keep) {
    size_t released = 0;
    while (pool_.size() > keep) {
      cu::check(d_.cuMemRelease(pool_.back()), "cuMemRelease");
      pool_.pop_back();
      ++released;
    }
    return released;
  }

  void resync_view(const PageRun& r) override {
    for (size_t p = r.first; p < r.first + r.count; ++p) view_[p] = handles_[p] ? 1 : 0;
  }

  void release_all() {
    std::lock_guard<std::mutex> g(mu_);
    if (!address_) return;
    DeviceScope scope(device_);
    d_.cuCtxSynchronize();
    for (size_t p = 0; p < handles_.size(); ++p) {
      if (!handles_[p]) continue;
      d_.cuMemUnmap(page_addr(p), page_size_);
      d_.cuMemRelease(handles_[p]);
      handles_[p] = 0;
    }
    for (auto h : pool_) d_.cuMemRelease(h);
    pool_.clear();
    d_.cuMemAddressFree(static_cast<cu::CUdeviceptr>(address_), size_);
    address_ = 0;
  }

  const cu::Driver& d_;
  std::vector<cu::CUmemGenericAllocationHandle> handles_;  // per page; 0 where this process has none mapped
  std::vector<cu::CUmemGenericAllocationHandle> pool_;
  size_t pool_limit_ = 64;
};

}  // namespace

bool cuda_available() {
  const cu::Driver* d = cu::driver();
  if (!d) return false;
  int count = 0;
  return d->cuDeviceGetCount(&count) == cu::CUDA_SUCCESS && count > 0;
}

size_t cuda_granularity(int device) {
  const cu::Driver& d = require_driver();
  primary_context(device);  // validates the device index with a clear message
  const cu::CUmemAllocationProp prop = cu::device_prop(device);
  size_t gran = 0;
  cu::check(d.cuMemGetAllocationGranularity(&gran, &prop, cu::CU_MEM_ALLOC_GRANULARITY_MINIMUM),
            "cuMemGetAllocationGranularity");
  return gran;
}

std::pair<size_t, size_t> cuda_mem_info(int device) {
  const cu::Driver& d = require_driver();
  DeviceScope scope(device);
  size_t free_bytes = 0, total_bytes = 0;
  cu::check(d.cuMemGetInfo(&free_bytes, &total_bytes), "cuMemGetInfo");
  return {free_bytes, total_bytes};
}

std::shared_ptr<Region> make_cuda_region(size_t size, size_t page_size, int device,
                                         const std::optional<std::string>& path) {
  return std::make_shared<CudaRegion>(size, page_size, device, path);
}

}  // namespace kvcached
