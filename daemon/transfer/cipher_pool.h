// Worker threads that seal and open the encrypted data path's records (data_path_crypto.h) on
// several cores, so that one connection is not bounded by what one core's AES-GCM moves. Records
// are independent under their sequence numbers: a sender reserves a range of them and has them
// sealed here in any order while its own thread sends them in order; a receiver reads records in
// order and has them opened here while it reads the next.
//
// The pool is shared by every connection of a process (CipherPool::Shared): its size bounds the
// cores the data path's cipher takes from the node, whatever the number of connections. Jobs
// run in the order they are queued.
//
// Thread-safe.
#ifndef TESSERA_DAEMON_TRANSFER_CIPHER_POOL_H_
#define TESSERA_DAEMON_TRANSFER_CIPHER_POOL_H_

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace tessera {

inline constexpr int kDefaultCipherThreads = 8;  // cluster.tls_cipher_threads
inline constexpr int kDefaultCipherNice = 5;     // cluster.tls_cipher_nice
inline constexpr int kMaxCipherThreads = 64;

class CipherPool {
 public:
  // `threads` in 1..kMaxCipherThreads (clamped).
  explicit CipherPool(int threads, int nice = 0);
  ~CipherPool();  // finishes the jobs queued, then joins
  CipherPool(const CipherPool&) = delete;
  CipherPool& operator=(const CipherPool&) = delete;

  int threads() const { return static_cast<int>(threads_.size()); }

  // Queues `job`; it runs on one of the pool's threads. An urgent job (a receiver's opening,
  // which a connection will wait for) runs before every job that is not (a sender's sealing,
  // done ahead of its socket).
  void Run(std::function<void()> job, bool urgent = false);

  // Buffers of `bytes` for sealed records, kept for reuse (at most 4 per thread of the pool's
  // worth) so that a sender does not fault fresh memory in for every range it sends.
  std::unique_ptr<uint8_t[]> TakeBuffer(size_t bytes);
  void GiveBuffer(std::unique_ptr<uint8_t[]> buffer, size_t bytes);

  // The process's pool: min(threads configured, hardware threads) threads, created on first
  // use. Configure (the daemon, from cluster.tls_cipher_threads) before the first use; later
  // calls change nothing.
  // `nice`: the pool's threads run at this nice value (0..19; setpriority), below the
  // connections' own threads and the node's trainers when above 0.
  static void Configure(int threads, int nice = 0);
  static CipherPool& Shared();

 private:
  void Loop(int nice);

  absl::Mutex mu_;
  absl::CondVar queued_;  // signalled once per job queued: one idle thread wakes for it
  std::deque<std::function<void()>> jobs_ ABSL_GUARDED_BY(mu_);
  std::deque<std::function<void()>> urgent_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  absl::Mutex buffers_mu_;
  std::vector<std::unique_ptr<uint8_t[]>> buffers_ ABSL_GUARDED_BY(buffers_mu_);
  size_t buffer_bytes_ ABSL_GUARDED_BY(buffers_mu_) = 0;  // the size of those kept
  std::vector<std::thread> threads_;  // last: started once the members above exist
};

// Waits for a set of jobs queued on a CipherPool: each is counted when queued (Add) and when it
// ends (Done); Wait returns once all have ended. A job that fails names the first record (the
// lowest sequence number) that failed.
class CipherJobs {
 public:
  void Add() {
    absl::MutexLock lock(&mu_);
    ++outstanding_;
  }
  void Done(bool ok, uint64_t sequence, size_t bytes);
  // Blocks until every job added has ended. false if one failed: *sequence and *bytes name the
  // first.
  bool Wait(uint64_t* sequence, size_t* bytes);

 private:
  absl::Mutex mu_;
  absl::CondVar ended_;
  int64_t outstanding_ ABSL_GUARDED_BY(mu_) = 0;
  bool failed_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t failed_sequence_ ABSL_GUARDED_BY(mu_) = 0;
  size_t failed_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_TRANSFER_CIPHER_POOL_H_
