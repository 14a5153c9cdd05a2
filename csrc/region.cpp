// The backend-independent half of Region: validation, the shared bitmap, the view, rollback and sync.
#include "region.h"

#include <unistd.h>

#include <algorithm>
#include <exception>
#include <iterator>
#include <stdexcept>

#include "errors.h"

namespace kvcached {

namespace {

// Rollback must not let a second failure hide the first: the caller rethrows the original error.
template <class F>
void quietly(F&& f) {
  try {
    f();
  } catch (...) {
  }
}

}  // namespace

std::vector<PageRun> to_runs(const std::vector<size_t>& pages) {
  std::vector<PageRun> runs;
  for (size_t p : pages) {
    if (!runs.empty() && runs.back().first + runs.back().count == p) {
      ++runs.back().count;
    } else {
      runs.push_back({p, 1});
    }
  }
  return runs;
}

std::shared_ptr<Region> Region::create(size_t size, size_t page_size, const std::string& backend, int device,
                                       const std::optional<std::string>& path, bool prefault) {
  if (page_size == 0) throw std::invalid_argument("page_size must be positive");
  if (size == 0 || size % page_size != 0) {
    throw std::invalid_argument("size " + std::to_string(size) + " must be a positive multiple of page_size " +
                                std::to_string(page_size) + ": round it up to whole pages");
  }
  if (path && path->empty()) throw std::invalid_argument("path must be a file path or None, not an empty string");
  if (backend == "host") {
    if (device != 0) throw std::invalid_argument("device applies to backend='cuda' only; leave it 0 for 'host'");
    return make_host_region(size, page_size, path, prefault);
  }
  if (backend == "cuda") {
    if (prefault) throw std::invalid_argument("prefault applies to backend='host' only (cuda maps eagerly)");
    return make_cuda_region(size, page_size, device, path);
  }
  if (backend == "state") {
    if (prefault) throw std::invalid_argument("prefault applies to backend='host' only (a state region has no memory)");
    return make_state_region(size, page_size, path);
  }
  throw std::invalid_argument("unknown backend '" + backend + "': use 'host', 'cuda' or 'state'");
}

Region::Region(size_t size, size_t page_size, int device, std::optional<std::string> path)
    : size_(size), page_size_(page_size), device_(device), path_(std::move(path)), view_(size / page_size, 0) {}

std::vector<size_t> Region::checked_pages(const std::vector<int64_t>& pages) const {
  const size_t n = num_pages();
  std::vector<size_t> out;
  out.reserve(pages.size());
  for (int64_t p : pages) {
    if (p < 0 || static_cast<size_t>(p) >= n) {
      throw std::out_of_range("page index " + std::to_string(p) + " out of range for a region of " +
                              std::to_string(n) + " pages");
    }
    out.push_back(static_cast<size_t>(p));
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

void Region::mark_view(const PageRun& r, bool mapped) {
  std::fill(view_.begin() + r.first, view_.begin() + r.first + r.count, mapped ? 1 : 0);
}

void Region::map(const std::vector<int64_t>& pages) {
  const std::vector<size_t> wanted = checked_pages(pages);  // before any change: IndexError leaves state as is
  std::lock_guard<std::mutex> g(mu_);
  FileLock fl(*state_);
  std::vector<size_t> fresh, view_only;
  for (size_t p : wanted) {
    if (!state_->test(p)) {
      fresh.push_back(p);
    } else if (!view_[p]) {
      view_only.push_back(p);  // committed by another process; this view has not caught up yet
    }
  }
  const std::vector<PageRun> fresh_runs = to_runs(fresh);
  size_t committed = 0;
  try {
    for (const PageRun& r : fresh_runs) {
      commit(r);
      ++committed;
    }
  } catch (...) {
    for (size_t i = 0; i < committed; ++i) quietly([&] { decommit(fresh_runs[i]); });
    throw;
  }
  std::vector<size_t> to_view;
  std::merge(fresh.begin(), fresh.end(), view_only.begin(), view_only.end(), std::back_inserter(to_view));
  const std::vector<PageRun> view_runs = to_runs(to_view);
  size_t viewed = 0;
  try {
    for (const PageRun& r : view_runs) {
      view_map(r);
      mark_view(r, true);
      ++viewed;
      if (prefault_) populate(r);
    }
  } catch (...) {
    for (size_t i = 0; i < viewed; ++i) {
      quietly([&] { view_unmap(view_runs[i]); });
      mark_view(view_runs[i], false);
    }
    for (const PageRun& r : fresh_runs) quietly([&] { decommit(r); });
    throw;
  }
  if (fresh.empty()) return;
  // Bits last: until here no other process may treat these pages as committed (sweep would punch them).
  for (size_t p : fresh) state_->set(p);
  const uint64_t before = state_->bump_generation();
  if (before == view_generation_) view_generation_ = before + 1;
}

void Region::unmap(const std::vector<int64_t>& pages) {
  const std::vector<size_t> wanted = checked_pages(pages);
  if (wanted.empty()) return;
  // Before the lock: the pages hold no live data (their owner stopped handing them out), so no work queued from
  // here on reads them, and a step's sync() or a map on another thread does not wait while the device drains.
  quiesce();
  std::lock_guard<std::mutex> g(mu_);
  FileLock fl(*state_);
  std::vector<size_t> release, unview;
  for (size_t p : wanted) {
    if (state_->test(p)) release.push_back(p);
    if (view_[p]) unview.push_back(p);
  }
  if (release.empty() && unview.empty()) return;
  // Clear the bits first so a concurrent sync() elsewhere stops mapping these pages as soon as possible.
  for (size_t p : release) state_->clear(p);
  uint64_t before = 0;
  if (!release.empty()) before = state_->bump_generation();
  // From here a failure must not hide the first error, nor leave a page whose memory is still held marked as
  // released: such pages get their bit back, and the caller learns the truth from is_mapped().
  std::exception_ptr first;
  for (const PageRun& r : to_runs(unview)) {
    try {
      view_unmap(r);
      mark_view(r, false);
    } catch (...) {
      if (!first) first = std::current_exception();
      resync_view(r);
    }
  }
  std::vector<size_t> decommittable, kept;
  for (size_t p : release) (view_[p] ? kept : decommittable).push_back(p);
  for (const PageRun& r : to_runs(decommittable)) {
    if (first) {  // after a failure, stop releasing: what is left stays committed and keeps its bit
      for (size_t p = r.first; p < r.first + r.count; ++p) kept.push_back(p);
      continue;
    }
    try {
      decommit(r);
    } catch (...) {
      first = std::current_exception();
      for (size_t p = r.first; p < r.first + r.count; ++p) kept.push_back(p);
    }
  }
  if (!kept.empty()) {
    for (size_t p : kept) state_->set(p);
    state_->bump_generation();  // views elsewhere resync to the restored bits
  } else if (!release.empty() && before == view_generation_) {
    view_generation_ = before + 1;
  }
  if (first) std::rethrow_exception(first);
}

bool Region::is_mapped(int64_t page) const {
  if (page < 0 || static_cast<size_t>(page) >= num_pages()) {
    throw std::out_of_range("page index " + std::to_string(page) + " out of range for a region of " +
                            std::to_string(num_pages()) + " pages");
  }
  return state_->test(static_cast<size_t>(page));
}

size_t Region::sync() {
  // Every engine step calls this first: a current view returns without the lock, so the step never queues behind
  // a map or unmap another thread of this process is running (their pages hold no block the step can read).
  if (state_->generation() == view_generation_.load(std::memory_order_acquire)) return 0;
  std::lock_guard<std::mutex> g(mu_);
  // Read the generation before the bits: if it moves while we scan, the next sync() scans again.
  const uint64_t gen = state_->generation();
  if (gen == view_generation_) return 0;
  std::vector<size_t> to_map, to_unmap;
  for (size_t p = 0; p < num_pages(); ++p) {
    const bool committed = state_->test(p);
    if (committed && !view_[p]) to_map.push_back(p);
    if (!committed && view_[p]) to_unmap.push_back(p);
  }
  if (!to_unmap.empty()) quiesce();
  for (const PageRun& r : to_runs(to_unmap)) {
    view_unmap(r);
    mark_view(r, false);
  }
  for (const PageRun& r : to_runs(to_map)) {
    view_map(r);  // on failure view_generation_ stays stale, so a later sync() retries the rest
    mark_view(r, true);
  }
  view_generation_ = gen;
  return to_map.size() + to_unmap.size();
}

size_t Region::pool_size() {
  throw std::logic_error("host regions have no handle pool: pool_size applies to backend='cuda'");
}
size_t Region::trim_pool(size_t) {
  throw std::logic_error("host regions have no handle pool: trim_pool applies to backend='cuda'");
}
void Region::set_pool_limit(size_t) {
  throw std::logic_error("host regions have no handle pool: set_pool_limit applies to backend='cuda'");
}

}  // namespace kvcached
