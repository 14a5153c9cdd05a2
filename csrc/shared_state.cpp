#include "shared_state.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <new>
#include <stdexcept>

#include "errors.h"

namespace kvcached {

namespace {

constexpr size_t kFileAlign = 4096;

size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

// Retries flock on EINTR: a signal (e.g. SIGCHLD in a server) must not turn into a spurious failure.
void flock_retry(int fd, int op) {
  while (flock(fd, op) != 0) {
    if (errno != EINTR) throw SystemError(errno, "flock on region file");
  }
}

}  // namespace

size_t SharedState::header_bytes(size_t num_pages) {
  return round_up(sizeof(Header) + (num_pages + 63) / 64 * sizeof(uint64_t), kFileAlign);
}

SharedState::SharedState(const char* path, Backend backend, size_t size, size_t page_size, size_t data_bytes)
    : num_pages_(size / page_size) {
  header_bytes_ = header_bytes(num_pages_);
  const off_t file_size = static_cast<off_t>(header_bytes_ + data_bytes);
  const std::string where = path ? std::string(path) : std::string("memfd");
  if (path) {
    // O_NOFOLLOW: a symlink planted in the shm directory must not redirect the pool to another file.
    fd_ = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd_ < 0) throw SystemError(errno, "open region file " + where);
  } else {
    fd_ = memfd_create("kvcached-region", MFD_CLOEXEC);
    if (fd_ < 0) throw SystemError(errno, "memfd_create");
  }
  try {
    flock_retry(fd_, LOCK_EX);
    struct stat st {};
    if (fstat(fd_, &st) != 0) throw SystemError(errno, "fstat " + where);
    const bool fresh = st.st_size == 0;
    if (fresh) {
      if (ftruncate(fd_, file_size) != 0) throw_errno(errno, "ftruncate " + where);
      // Allocate the header pages up front: the header is always fully resident, so the file's block
      // count minus header_bytes is exactly the data it holds.
      if (fallocate(fd_, 0, 0, static_cast<off_t>(header_bytes_)) != 0) throw_errno(errno, "fallocate header of " + where);
    } else if (st.st_size != file_size) {
      throw std::invalid_argument("region file " + where + " has " + std::to_string(st.st_size) +
                                  " bytes, expected " + std::to_string(file_size) +
                                  " for this size/page_size/backend: remove the stale file or use another path");
    }
    void* p = mmap(nullptr, header_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
    if (p == MAP_FAILED) throw_errno(errno, "mmap header of " + where);
    header_ = static_cast<Header*>(p);
    if (fresh) {
      header_->version = kVersion;
      header_->backend = static_cast<uint32_t>(backend);
      header_->size = size;
      header_->page_size = page_size;
      header_->num_pages = num_pages_;
      header_->generation.store(1, std::memory_order_relaxed);
      header_->num_mapped.store(0, std::memory_order_relaxed);
      // Magic last: a reader that sees it sees a complete header (we also hold the flock).
      std::atomic_thread_fence(std::memory_order_release);
      header_->magic = kMagic;
    } else if (header_->magic != kMagic || header_->version != kVersion ||
               header_->backend != static_cast<uint32_t>(backend) || header_->size != size ||
               header_->page_size != page_size) {
      throw std::invalid_argument("region file " + where + " was created with size " +
                                  std::to_string(header_->size) + ", page_size " +
                                  std::to_string(header_->page_size) + ", backend " +
                                  (header_->backend == 0 ? "host" : "cuda") +
                                  ": open it with the same parameters, or remove the stale file");
    }
    flock_retry(fd_, LOCK_UN);
  } catch (...) {
    if (header_) munmap(header_, header_bytes_);
    close(fd_);
    throw;
  }
}

SharedState::~SharedState() {
  if (header_) munmap(header_, header_bytes_);
  if (fd_ >= 0) close(fd_);
}

std::atomic<uint64_t>* SharedState::word(size_t page) const {
  auto* bits = reinterpret_cast<std::atomic<uint64_t>*>(reinterpret_cast<char*>(header_) + sizeof(Header));
  return bits + page / 64;
}

bool SharedState::test(size_t page) const {
  return (word(page)->load(std::memory_order_acquire) >> (page % 64)) & 1;
}

bool SharedState::set(size_t page) {
  const uint64_t m = uint64_t{1} << (page % 64);
  if (word(page)->fetch_or(m, std::memory_order_acq_rel) & m) return false;
  header_->num_mapped.fetch_add(1, std::memory_order_acq_rel);
  return true;
}

bool SharedState::clear(size_t page) {
  const uint64_t m = uint64_t{1} << (page % 64);
  if (!(word(page)->fetch_and(~m, std::memory_order_acq_rel) & m)) return false;
  header_->num_mapped.fetch_sub(1, std::memory_order_acq_rel);
  return true;
}

void SharedState::lock_exclusive() { flock_retry(fd_, LOCK_EX); }
void SharedState::unlock() { flock_retry(fd_, LOCK_UN); }

}  // namespace kvcached
