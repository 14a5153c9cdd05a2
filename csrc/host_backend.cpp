// Host backend: pages live in a tmpfs file (memfd, or a /dev/shm path shared between processes).
//
// Layout of the file: [shared header, rounded to 4 KiB][data: size bytes], sparse.
// The view reserves the whole range as a PRIVATE ANONYMOUS mapping and maps the file only over committed
// pages. Why not map the whole file shared: reading a hole of a MAP_SHARED tmpfs mapping allocates a page
// (measured on this kernel), while reading a hole of a private anonymous mapping maps the kernel's zero page
// and commits nothing. So a stray read of an uncommitted block costs no memory.
//
// Commit is fallocate (allocates the shmem pages; zeroing is deferred to the first fault), release is
// fallocate(PUNCH_HOLE), which frees the pages in every process that had them mapped.
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <stdexcept>

#include "errors.h"
#include "region.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace kvcached {

size_t host_granularity() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

namespace {

// The largest power of two dividing page_size, capped at 2 MiB: aligning the view to it lets the kernel
// use large mappings where it can, and costs at most that much extra reserved (never committed) space.
size_t view_alignment(size_t page_size) {
  size_t a = page_size & (~page_size + 1);
  return std::min<size_t>(a, size_t{2} << 20);
}

class HostRegion final : public Region {
 public:
  HostRegion(size_t size, size_t page_size, const std::optional<std::string>& path, bool prefault)
      : Region(size, page_size, 0, path) {
    const size_t os_page = host_granularity();
    if (page_size % os_page != 0) {
      throw std::invalid_argument("page_size " + std::to_string(page_size) + " must be a multiple of the OS page size " +
                                  std::to_string(os_page));
    }
    prefault_ = prefault;
    state_ = std::make_unique<SharedState>(path ? path->c_str() : nullptr, Backend::Host, size, page_size, size);
    data_offset_ = state_->header_size();

    const size_t align = view_alignment(page_size);
    void* raw = mmap(nullptr, size + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) throw_errno(errno, "reserve " + std::to_string(size) + " bytes of address space");
    const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (start + align - 1) / align * align;
    if (aligned > start) munmap(raw, aligned - start);
    const uintptr_t end = start + size + align;
    if (end > aligned + size) munmap(reinterpret_cast<void*>(aligned + size), end - (aligned + size));
    address_ = aligned;
    // Opening an existing path: show what other processes already committed.
    sync();
  }

  ~HostRegion() override {
    if (address_) munmap(reinterpret_cast<void*>(address_), size_);
  }

  const char* backend_name() const override { return "host"; }
  int dlpack_device_type() const override { return 1; /* kDLCPU */ }

  std::vector<int64_t> resident_pages() override {
    std::lock_guard<std::mutex> g(mu_);
    std::vector<uint8_t> resident = data_pages();
    // tmpfs reports fallocated pages as holes to SEEK_DATA until their first touch, yet they are allocated;
    // committed pages therefore count as resident from the shared state.
    for (size_t p = 0; p < num_pages(); ++p) {
      if (state_->test(p)) resident[p] = 1;
    }
    std::vector<int64_t> out;
    for (size_t p = 0; p < num_pages(); ++p) {
      if (resident[p]) out.push_back(static_cast<int64_t>(p));
    }
    return out;
  }

  size_t sweep() override {
    std::lock_guard<std::mutex> g(mu_);
    FileLock fl(*state_);
    const std::vector<uint8_t> data = data_pages();
    std::vector<size_t> stray;
    for (size_t p = 0; p < num_pages(); ++p) {
      if (data[p] && !state_->test(p)) stray.push_back(p);
    }
    std::vector<size_t> stale_view;
    for (size_t p : stray) {
      if (view_[p]) stale_view.push_back(p);
    }
    for (const PageRun& r : to_runs(stale_view)) {
      view_unmap(r);
      mark_view(r, false);
    }
    for (const PageRun& r : to_runs(stray)) decommit(r);
    // A stray WRITE through this process's anonymous part made private pages the file never sees; drop them.
    std::vector<size_t> anon;
    for (size_t p = 0; p < num_pages(); ++p) {
      if (!view_[p]) anon.push_back(p);
    }
    for (const PageRun& r : to_runs(anon)) madvise(addr(r), bytes(r), MADV_DONTNEED);
    return stray.size();
  }

  size_t backing_bytes() override {
    struct stat st {};
    if (fstat(state_->fd(), &st) != 0) throw SystemError(errno, "fstat region file");
    const size_t allocated = static_cast<size_t>(st.st_blocks) * 512;
    // The header is fully allocated at creation (see SharedState), so the rest is data.
    return allocated > data_offset_ ? allocated - data_offset_ : 0;
  }

 protected:
  void commit(const PageRun& r) override {
    if (fallocate(state_->fd(), 0, file_off(r), static_cast<off_t>(bytes(r))) != 0) {
      const int e = errno;
      // tmpfs may keep part of a failed range; free it so a failed map leaves nothing behind.
      fallocate(state_->fd(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, file_off(r), static_cast<off_t>(bytes(r)));
      throw_errno(e, "commit " + std::to_string(r.count) + " page(s) at page " + std::to_string(r.first));
    }
  }

  void decommit(const PageRun& r) override {
    if (fallocate(state_->fd(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, file_off(r),
                  static_cast<off_t>(bytes(r))) != 0) {
      throw SystemError(errno, "release (punch hole) page(s) at page " + std::to_string(r.first));
    }
  }

  void view_map(const PageRun& r) override {
    void* p = mmap(addr(r), bytes(r), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, state_->fd(), file_off(r));
    if (p == MAP_FAILED) throw_errno(errno, "map committed pages into this process");
  }

  void view_unmap(const PageRun& r) override {
    void* p = mmap(addr(r), bytes(r), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) throw_errno(errno, "replace released pages with the zero page");
  }

  void populate(const PageRun& r) override {
    if (madvise(addr(r), bytes(r), MADV_POPULATE_WRITE) == 0) return;
    if (errno != EINVAL) throw_errno(errno, "prefault committed pages");
    // Kernels before 5.14 lack MADV_POPULATE_WRITE: touch one byte per OS page instead.
    volatile char* base = static_cast<volatile char*>(addr(r));
    const size_t step = host_granularity();
    for (size_t off = 0; off < bytes(r); off += step) base[off] = base[off];
  }

 private:
  void* addr(const PageRun& r) const { return reinterpret_cast<void*>(address_ + r.first * page_size_); }
  size_t bytes(const PageRun& r) const { return r.count * page_size_; }
  off_t file_off(const PageRun& r) const { return static_cast<off_t>(data_offset_ + r.first * page_size_); }

  // 1 for each page of which SEEK_DATA reports data (pages that were touched).
  std::vector<uint8_t> data_pages() {
    std::vector<uint8_t> out(num_pages(), 0);
    const off_t begin = static_cast<off_t>(data_offset_);
    const off_t end = static_cast<off_t>(data_offset_ + size_);
    off_t pos = begin;
    while (pos < end) {
      const off_t d = lseek(state_->fd(), pos, SEEK_DATA);
      if (d < 0) {
        if (errno == ENXIO) break;  // no data after pos
        throw SystemError(errno, "lseek(SEEK_DATA) on region file");
      }
      if (d >= end) break;
      off_t h = lseek(state_->fd(), d, SEEK_HOLE);
      if (h < 0) throw SystemError(errno, "lseek(SEEK_HOLE) on region file");
      h = std::min(h, end);
      const size_t first = static_cast<size_t>(d - begin) / page_size_;
      const size_t last = static_cast<size_t>(h - 1 - begin) / page_size_;
      std::fill(out.begin() + first, out.begin() + last + 1, 1);
      pos = h;
    }
    return out;
  }

  size_t data_offset_ = 0;
};

}  // namespace

std::shared_ptr<Region> make_host_region(size_t size, size_t page_size, const std::optional<std::string>& path,
                                         bool prefault) {
  return std::make_shared<HostRegion>(size, page_size, path, prefault);
}

}  // namespace kvcached
