// Region: a reserved range of virtual addresses whose pages are backed by physical memory only while
// committed. One interface, two backends (host: memfd/tmpfs file; cuda: driver VMM), in the manner of
// PyTorch's ExpandableSegment: reserve, map and unmap in one small type with clear ownership. A third,
// state-only kind (state_backend.cpp) lets a process without device memory decide for a cuda region.
//
// State lives in two places:
//   * the shared state (SharedState): which pages are committed, agreed by every process on the path;
//   * this process's view (view_): which pages THIS process has mapped into its address space.
// map/unmap change both; sync() brings the view up to the shared state after another process changed it.
//
// Thread safety: every public method takes mu_ (the Python bindings release the GIL around them), and
// map/unmap/sweep also take the file's flock so processes sharing a path do not interleave. Two exceptions keep an
// engine's step off that lock: sync() returns without it when the view is current, and unmap() waits for the
// device (quiesce) before taking it, so a step never waits behind an unmap draining the GPU.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "shared_state.h"

namespace kvcached {

// A run of consecutive pages [first, first + count): backends act on runs so one syscall covers many pages.
struct PageRun {
  size_t first;
  size_t count;
};

// Coalesces sorted, unique page indices into runs.
std::vector<PageRun> to_runs(const std::vector<size_t>& sorted_pages);

class Region {
 public:
  // Factory: validates parameters (std::invalid_argument -> ValueError) and builds the chosen backend.
  static std::shared_ptr<Region> create(size_t size, size_t page_size, const std::string& backend, int device,
                                        const std::optional<std::string>& path, bool prefault);
  virtual ~Region() = default;
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;

  size_t size() const { return size_; }
  size_t page_size() const { return page_size_; }
  size_t num_pages() const { return size_ / page_size_; }
  int device() const { return device_; }
  uintptr_t address() const { return address_; }
  const std::optional<std::string>& path() const { return path_; }
  virtual const char* backend_name() const = 0;
  virtual int dlpack_device_type() const = 0;

  // Commit physical memory for pages; all-or-nothing (rolls back this call's work and rethrows).
  void map(const std::vector<int64_t>& pages);
  // Give pages' physical memory back; pages not committed are skipped.
  void unmap(const std::vector<int64_t>& pages);
  bool is_mapped(int64_t page) const;
  size_t num_mapped() const { return state_->num_mapped(); }
  // Applies the shared state to this process's view; returns the number of pages whose view changed.
  virtual size_t sync();
  virtual std::vector<int64_t> resident_pages() = 0;
  virtual size_t sweep() = 0;
  // Physical bytes this region holds for data right now, as the kernel/driver accounts them.
  virtual size_t backing_bytes() = 0;

  // Handle pool (cuda only; the host backend throws std::logic_error -> TypeError).
  virtual size_t pool_size();
  virtual size_t trim_pool(size_t keep);
  virtual void set_pool_limit(size_t n);

 protected:
  Region(size_t size, size_t page_size, int device, std::optional<std::string> path);

  // Backend hooks, called with mu_ and the file lock held. Each throws on failure after undoing its own
  // partial work, so the caller only rolls back runs that fully succeeded.
  virtual void commit(const PageRun& r) = 0;      // physical memory shared by all views (host: fallocate)
  virtual void decommit(const PageRun& r) = 0;    // give it back (host: punch a hole)
  virtual void view_map(const PageRun& r) = 0;    // make this process's addresses see the memory
  virtual void view_unmap(const PageRun& r) = 0;  // and stop seeing it (the caller has quiesced the device)
  // Waits until device work queued so far has finished, so memory about to be unmapped is read no more (cuda:
  // the context synchronizes; host memory needs nothing). Called once per batch of unmaps, not per run: unmap()
  // calls it before taking mu_, sync() under it, only when it has pages to unmap.
  virtual void quiesce() {}
  virtual void populate(const PageRun& r) { (void)r; }  // prefault=True: pay the faults now
  // After view_unmap(r) failed part-way: make view_ say which pages of r this process still has mapped. A
  // backend whose view_unmap is all-or-nothing (host: one mmap call) keeps the default, which changes nothing.
  virtual void resync_view(const PageRun& r) { (void)r; }

  // Validates and sorts/dedupes page indices (IndexError on out-of-range).
  std::vector<size_t> checked_pages(const std::vector<int64_t>& pages) const;
  // Records in view_ that this process now has (or no longer has) run r mapped.
  void mark_view(const PageRun& r, bool mapped);

  const size_t size_;
  const size_t page_size_;
  const int device_;
  const std::optional<std::string> path_;
  uintptr_t address_ = 0;
  bool prefault_ = false;
  std::unique_ptr<SharedState> state_;
  std::vector<uint8_t> view_;     // 1 where this process has the page mapped
  std::atomic<uint64_t> view_generation_{0};  // the shared generation this view last matched completely
  mutable std::mutex mu_;
};

std::shared_ptr<Region> make_host_region(size_t size, size_t page_size, const std::optional<std::string>& path,
                                         bool prefault);
std::shared_ptr<Region> make_cuda_region(size_t size, size_t page_size, int device,
                                         const std::optional<std::string>& path);
std::shared_ptr<Region> make_state_region(size_t size, size_t page_size, const std::optional<std::string>& path);

size_t host_granularity();
size_t cuda_granularity(int device);
bool cuda_available();
std::pair<size_t, size_t> cuda_mem_info(int device);

}  // namespace kvcached
