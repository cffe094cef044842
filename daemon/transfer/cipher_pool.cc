#include "daemon/transfer/cipher_pool.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <utility>

namespace tessera {
namespace {

std::atomic<int> configured_threads{kDefaultCipherThreads};
std::atomic<int> configured_nice{kDefaultCipherNice};

}  // namespace

CipherPool::CipherPool(int threads, int nice) {
  threads = std::clamp(threads, 1, kMaxCipherThreads);
  threads_.reserve(static_cast<size_t>(threads));
  for (int i = 0; i < threads; ++i) threads_.emplace_back([this, nice] { Loop(nice); });
}

CipherPool::~CipherPool() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    queued_.SignalAll();
  }
  for (std::thread& t : threads_) t.join();
}

void CipherPool::Run(std::function<void()> job, bool urgent) {
  absl::MutexLock lock(&mu_);
  (urgent ? urgent_ : jobs_).push_back(std::move(job));
  queued_.Signal();
}

void CipherPool::Loop(int nice) {
  if (nice > 0) {  // this thread only (Linux: a thread's id names it to setpriority)
    (void)setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), std::min(nice, 19));
  }
  for (;;) {
    std::function<void()> job;
    {
      absl::MutexLock lock(&mu_);
      while (jobs_.empty() && urgent_.empty() && !stopping_) queued_.Wait(&mu_);
      std::deque<std::function<void()>>& queue = urgent_.empty() ? jobs_ : urgent_;
      if (queue.empty()) return;  // stopping, and every job queued has run
      job = std::move(queue.front());
      queue.pop_front();
    }
    job();
  }
}

std::unique_ptr<uint8_t[]> CipherPool::TakeBuffer(size_t bytes) {
  {
    absl::MutexLock lock(&buffers_mu_);
    if (buffer_bytes_ == bytes && !buffers_.empty()) {
      std::unique_ptr<uint8_t[]> buffer = std::move(buffers_.back());
      buffers_.pop_back();
      return buffer;
    }
  }
  return std::unique_ptr<uint8_t[]>(new uint8_t[bytes]);  // left uninitialized: sealed over
}

void CipherPool::GiveBuffer(std::unique_ptr<uint8_t[]> buffer, size_t bytes) {
  absl::MutexLock lock(&buffers_mu_);
  if (buffer_bytes_ != bytes) {  // buffers of another size: keep the newest size only
    buffers_.clear();
    buffer_bytes_ = bytes;
  }
  if (buffers_.size() < 4 * threads_.size()) {
    buffers_.push_back(std::move(buffer));
  }
}

void CipherPool::Configure(int threads, int nice) {
  configured_threads.store(std::clamp(threads, 1, kMaxCipherThreads));
  configured_nice.store(std::clamp(nice, 0, 19));
}

CipherPool& CipherPool::Shared() {
  static CipherPool* const pool = [] {
    const int hardware = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    return new CipherPool(std::min(configured_threads.load(), hardware), configured_nice.load());
  }();
  return *pool;
}

void CipherJobs::Done(bool ok, uint64_t sequence, size_t bytes) {
  absl::MutexLock lock(&mu_);
  if (--outstanding_ == 0) ended_.SignalAll();
  if (!ok && (!failed_ || sequence < failed_sequence_)) {
    failed_ = true;
    failed_sequence_ = sequence;
    failed_bytes_ = bytes;
  }
}

bool CipherJobs::Wait(uint64_t* sequence, size_t* bytes) {
  absl::MutexLock lock(&mu_);
  while (outstanding_ > 0) ended_.Wait(&mu_);
  if (!failed_) return true;
  *sequence = failed_sequence_;
  *bytes = failed_bytes_;
  return false;
}

}  // namespace tessera
