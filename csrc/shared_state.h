// The committed-page state of a region, kept in the first bytes of a file so several processes agree on it.
//
// Why a file: in vLLM-CPU the scheduler process decides which blocks are live (it maps and unmaps) while
// the worker process holds the tensors. Both open the same /dev/shm file; the worker calls Region::sync()
// each step to make its own view match. Without a path the file is a private memfd and the state is private.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

namespace kvcached {

enum class Backend : uint32_t { Host = 0, Cuda = 1 };

class SharedState {
 public:
  // Header layout: fixed fields, then one bit per page. Lock-free 64-bit atomics are address-free on the
  // platforms we build for, so they work across processes through MAP_SHARED.
  struct Header {
    uint64_t magic;
    uint32_t version;
    uint32_t backend;
    uint64_t size;
    uint64_t page_size;
    uint64_t num_pages;
    std::atomic<uint64_t> generation;  // bumped on every change of the bitmap; sync() compares it
    std::atomic<uint64_t> num_mapped;
    uint64_t reserved;
  };
  static_assert(sizeof(Header) == 64, "the shared header layout is part of the file format");
  static constexpr uint64_t kMagic = 0x314e47455243564bULL;  // "KVCREGN1" little-endian
  static constexpr uint32_t kVersion = 1;

  // Bytes the header occupies at the start of the file, rounded to 4 KiB so data after it can be mmapped.
  static size_t header_bytes(size_t num_pages);

  // Opens (path given) or creates (memfd) the backing file, sized to header + data_bytes (sparse), and
  // initialises or validates the header under flock so concurrent openers agree. Throws ValueError-like
  // std::invalid_argument naming the path when an existing file disagrees on size or page size.
  SharedState(const char* path, Backend backend, size_t size, size_t page_size, size_t data_bytes);
  ~SharedState();
  SharedState(const SharedState&) = delete;
  SharedState& operator=(const SharedState&) = delete;

  int fd() const { return fd_; }
  size_t header_size() const { return header_bytes_; }
  size_t num_pages() const { return num_pages_; }

  bool test(size_t page) const;
  // Set/clear a bit; returns true when the bit changed. Keeps num_mapped exact under concurrent writers.
  bool set(size_t page);
  bool clear(size_t page);
  uint64_t generation() const { return header_->generation.load(std::memory_order_acquire); }
  uint64_t bump_generation() { return header_->generation.fetch_add(1, std::memory_order_acq_rel); }
  uint64_t num_mapped() const { return header_->num_mapped.load(std::memory_order_acquire); }

  // Cross-process exclusion of map/unmap/sweep on one file (flock is per open file description, so two
  // Region objects in one process exclude each other too). RAII guard below.
  void lock_exclusive();
  void unlock();

 private:
  std::atomic<uint64_t>* word(size_t page) const;

  int fd_ = -1;
  Header* header_ = nullptr;
  size_t header_bytes_ = 0;
  size_t num_pages_ = 0;
};

class FileLock {
 public:
  explicit FileLock(SharedState& s) : s_(s) { s_.lock_exclusive(); }
  ~FileLock() { s_.unlock(); }
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;

 private:
  SharedState& s_;
};

}  // namespace kvcached
