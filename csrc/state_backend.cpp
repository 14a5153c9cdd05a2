// State-only region: the shared committed-page bitmap of a cuda region, with no address space and no memory.
//
// Why: on CUDA the scheduler process decides which pages are committed while the worker processes hold the
// device memory. Physical GPU memory cannot be shared between processes without exporting handles, and a
// scheduler that opened a real cuda Region would create a CUDA context and allocate memory of its own. So
// the scheduler opens the worker's region file with backend="state": map/unmap only flip bits (and the
// generation), and each worker's sync() does the real cuMemMap/cuMemUnmap in its own context. It needs no
// CUDA driver at all.
#include <stdexcept>

#include "region.h"

namespace kvcached {

namespace {

class StateRegion final : public Region {
 public:
  StateRegion(size_t size, size_t page_size, const std::optional<std::string>& path)
      : Region(size, page_size, 0, path) {
    state_ = std::make_unique<SharedState>(path ? path->c_str() : nullptr, Backend::Cuda, size, page_size, 0);
  }

  const char* backend_name() const override { return "state"; }
  int dlpack_device_type() const override {
    throw std::invalid_argument("a backend='state' region holds no memory to view: open it with backend='cuda'");
  }

  // Nothing to apply: this process has no view.
  size_t sync() override { return 0; }
  std::vector<int64_t> resident_pages() override { return {}; }
  size_t sweep() override { return 0; }
  size_t backing_bytes() override { return 0; }

 protected:
  void commit(const PageRun&) override {}
  void decommit(const PageRun&) override {}
  void view_map(const PageRun&) override {}
  void view_unmap(const PageRun&) override {}
};

}  // namespace

std::shared_ptr<Region> make_state_region(size_t size, size_t page_size, const std::optional<std::string>& path) {
  if (!path) {
    throw std::invalid_argument(
        "backend='state' needs path: it opens the region file of a cuda Region made in another process");
  }
  return std::make_shared<StateRegion>(size, page_size, path);
}

}  // namespace kvcached
