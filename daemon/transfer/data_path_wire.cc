// Io's sealed sends and opened reads (data_path_wire.h): the record layer of data path version 2.
#include "daemon/transfer/data_path_wire.h"

#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace tessera {
namespace data_path_wire {
namespace {

// Bytes encrypted (or decrypted) between two socket calls: small enough that they are still in
// the cache when the kernel copies them, large enough that a chunk costs few system calls.
constexpr size_t kCipherPieceBytes = size_t{256} << 10;
// A buffered record's plaintext larger than this is given back once read.
constexpr size_t kKeptBufferBytes = size_t{1} << 20;

// Sends and records this large (a chunk) are pipelined: AES-GCM on one core runs at about the
// rate of one TCP stream, so a thread that alternates between the cipher and the socket moves a
// chunk at half of either (0.45 of the plain path on a 16-core machine). With a second thread
// the socket copies one piece while the cipher works on the next (sending) or the previous
// (receiving), and a connection runs at the slower of the two instead of their sum.
constexpr size_t kPipelineBytes = size_t{512} << 10;
// The pieces handed between the two threads: small, so that filling and draining the pipeline
// costs little of a chunk.
constexpr size_t kPipelinePieceBytes = size_t{64} << 10;
constexpr int kPipelineBuffers = 4;

// The second thread of an I/O thread, kept for its life (thread_local): runs one job at a time.
class SocketHelper {
 public:
  SocketHelper() : thread_([this] { Loop(); }) {}
  ~SocketHelper() {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    thread_.join();
  }
  SocketHelper(const SocketHelper&) = delete;
  SocketHelper& operator=(const SocketHelper&) = delete;

  // Runs `job` on the helper's thread. REQUIRES: the previous job was waited for.
  void Start(std::function<void()> job) {
    absl::MutexLock lock(&mu_);
    job_ = std::move(job);
  }
  // Waits until the job started last has returned.
  void Wait() {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](SocketHelper* h) ABSL_NO_THREAD_SAFETY_ANALYSIS { return !h->job_ && !h->running_; },
        this));
  }

  static SocketHelper& OfThisThread() {
    thread_local std::unique_ptr<SocketHelper> helper;
    if (helper == nullptr) helper = std::make_unique<SocketHelper>();
    return *helper;
  }

 private:
  void Loop() {
    for (;;) {
      std::function<void()> job;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(
            +[](SocketHelper* h)
                 ABSL_NO_THREAD_SAFETY_ANALYSIS { return h->job_ != nullptr || h->stopping_; },
            this));
        if (job_ == nullptr) return;  // stopping
        job = std::move(job_);
        job_ = nullptr;
        running_ = true;
      }
      job();
      absl::MutexLock lock(&mu_);
      running_ = false;
    }
  }

  absl::Mutex mu_;
  std::function<void()> job_ ABSL_GUARDED_BY(mu_);
  bool running_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;  // last: started once the members above exist
};

// Where sealed bytes go: a buffer that Flush hands on (sent, or queued to be sent) before the
// buffer is filled again.
struct SealedSink {
  uint8_t* data = nullptr;
  size_t capacity = 0;
  size_t used = 0;
  std::function<absl::Status()> flush;  // sends data[0, used); afterwards data may change
};

// Seals iov's bytes in records into `sink`.
absl::Status SealInto(RecordSealer* sealer, const iovec* iov, int count, SealedSink* sink) {
  for (int i = 0; i < count; ++i) {
    const auto* p = static_cast<const uint8_t*>(iov[i].iov_base);
    size_t left = iov[i].iov_len;
    while (left > 0) {
      const size_t record = std::min(left, kMaxRecordBytes);
      if (sink->capacity - sink->used < kRecordHeaderBytes) TESSERA_RETURN_IF_ERROR(sink->flush());
      TESSERA_RETURN_IF_ERROR(sealer->Begin(record, sink->data + sink->used));
      sink->used += kRecordHeaderBytes;
      for (size_t pos = 0; pos < record;) {
        if (sink->used == sink->capacity) TESSERA_RETURN_IF_ERROR(sink->flush());
        const size_t n = std::min(record - pos, sink->capacity - sink->used);
        sealer->Update(p + pos, sink->data + sink->used, n);
        sink->used += n;
        pos += n;
      }
      if (sink->capacity - sink->used < kRecordTagBytes) TESSERA_RETURN_IF_ERROR(sink->flush());
      TESSERA_RETURN_IF_ERROR(sealer->Finish(sink->data + sink->used));
      sink->used += kRecordTagBytes;
      p += record;
      left -= record;
    }
  }
  return sink->flush();
}

}  // namespace

absl::Status Io::SendSealed(const iovec* iov, int count) {
  size_t total = 0;
  for (int i = 0; i < count; ++i) total += iov[i].iov_len;
  if (total >= kPipelineBytes) return SendSealedPipelined(iov, count);
  // Records are built in one buffer per thread and sent as it fills: the header, the ciphertext
  // in pieces, the tag; several small records (a frame's length and its message) go out in one
  // send.
  thread_local std::vector<uint8_t> out(kCipherPieceBytes);
  SealedSink sink;
  sink.data = out.data();
  sink.capacity = out.size();
  sink.flush = [&]() -> absl::Status {
    if (sink.used == 0) return absl::OkStatus();
    iovec v{out.data(), sink.used};
    sink.used = 0;
    return SendPlain(&v, 1);
  };
  return SealInto(sealer, iov, count, &sink);
}

absl::Status Io::SendSealedPipelined(const iovec* iov, int count) {
  // This thread seals into a ring of buffers; the helper sends them in order.
  thread_local std::vector<std::vector<uint8_t>> this_threads_ring(
      kPipelineBuffers, std::vector<uint8_t>(kPipelinePieceBytes));
  std::vector<std::vector<uint8_t>>& ring = this_threads_ring;  // the helper sees this thread's
  struct Shared {
    absl::Mutex mu;
    std::vector<std::pair<int, size_t>> queue ABSL_GUARDED_BY(mu);  // (buffer, bytes), in order
    int in_flight ABSL_GUARDED_BY(mu) = 0;                          // queued or being sent
    bool done ABSL_GUARDED_BY(mu) = false;
    absl::Status error ABSL_GUARDED_BY(mu);
  } shared;
  SocketHelper& helper = SocketHelper::OfThisThread();
  helper.Start([&] {
    for (size_t next = 0;; ++next) {
      std::pair<int, size_t> piece;
      {
        absl::MutexLock lock(&shared.mu);
        const std::pair<Shared*, size_t> wait{&shared, next};
        shared.mu.Await(absl::Condition(
            +[](const std::pair<Shared*, size_t>* w) ABSL_NO_THREAD_SAFETY_ANALYSIS {
              return w->first->queue.size() > w->second || w->first->done;
            },
            &wait));
        if (shared.queue.size() <= next) return;  // done, all sent
        piece = shared.queue[next];
      }
      iovec v{ring[piece.first].data(), piece.second};
      absl::Status sent = SendPlain(&v, 1);
      absl::MutexLock lock(&shared.mu);
      --shared.in_flight;
      if (!sent.ok()) {
        shared.error = sent;
        return;
      }
    }
  });
  int current = 0;
  SealedSink sink;
  sink.data = ring[0].data();
  sink.capacity = kPipelinePieceBytes;
  sink.flush = [&]() -> absl::Status {
    if (sink.used == 0) return absl::OkStatus();
    absl::MutexLock lock(&shared.mu);
    if (!shared.error.ok()) return shared.error;
    shared.queue.emplace_back(current, sink.used);
    ++shared.in_flight;
    // The next buffer is free once fewer than all of them are queued or being sent.
    shared.mu.Await(absl::Condition(
        +[](Shared* s) ABSL_NO_THREAD_SAFETY_ANALYSIS {
          return s->in_flight < kPipelineBuffers || !s->error.ok();
        },
        &shared));
    if (!shared.error.ok()) return shared.error;
    current = (current + 1) % kPipelineBuffers;
    sink.data = ring[current].data();
    sink.used = 0;
    return absl::OkStatus();
  };
  absl::Status sealed = SealInto(sealer, iov, count, &sink);
  {
    absl::MutexLock lock(&shared.mu);
    shared.done = true;
  }
  helper.Wait();
  absl::MutexLock lock(&shared.mu);
  return sealed.ok() ? shared.error : sealed;
}

absl::Status Io::RecvOpened(uint8_t* dst, size_t size) {
  std::vector<uint8_t>& buffer = opener->buffer();
  while (size > 0) {
    if (opener->buffer_offset < buffer.size()) {
      const size_t n = std::min(size, buffer.size() - opener->buffer_offset);
      std::memcpy(dst, buffer.data() + opener->buffer_offset, n);
      opener->buffer_offset += n;
      dst += n;
      size -= n;
      if (opener->buffer_offset == buffer.size()) {
        buffer.clear();
        opener->buffer_offset = 0;
        if (buffer.capacity() > kKeptBufferBytes) buffer.shrink_to_fit();
      }
      continue;
    }
    uint8_t header[kRecordHeaderBytes];
    TESSERA_RETURN_IF_ERROR(RecvPlain(header, sizeof(header)));
    absl::StatusOr<size_t> record = opener->Begin(header);
    if (!record.ok()) return record.status();
    // A record that fits what is asked for is read and decrypted where it goes (a chunk into
    // its fragment's memory); a longer one through the buffer.
    const bool direct = *record <= size;
    if (!direct) buffer.resize(*record);
    uint8_t* target = direct ? dst : buffer.data();
    uint8_t tag[kRecordTagBytes];
    if (*record >= kPipelineBytes) {
      TESSERA_RETURN_IF_ERROR(RecvPipelined(target, *record, tag));
    } else {
      for (size_t pos = 0; pos < *record;) {
        const size_t n = std::min(*record - pos, kCipherPieceBytes);
        TESSERA_RETURN_IF_ERROR(RecvPlain(target + pos, n));
        opener->Update(target + pos, n);
        pos += n;
      }
      TESSERA_RETURN_IF_ERROR(RecvPlain(tag, sizeof(tag)));
    }
    if (absl::Status s = opener->Finish(tag); !s.ok()) {
      buffer.clear();
      return s;
    }
    if (direct) {
      dst += *record;
      size -= *record;
    }
  }
  return absl::OkStatus();
}

absl::Status Io::RecvPipelined(uint8_t* target, size_t size, uint8_t tag[kRecordTagBytes]) {
  // The helper reads the record's bytes and its tag; this thread decrypts what has arrived.
  struct Shared {
    absl::Mutex mu;
    size_t received ABSL_GUARDED_BY(mu) = 0;
    bool done ABSL_GUARDED_BY(mu) = false;
    absl::Status error ABSL_GUARDED_BY(mu);
  } shared;
  SocketHelper& helper = SocketHelper::OfThisThread();
  helper.Start([&] {
    absl::Status status;
    for (size_t pos = 0; pos < size && status.ok();) {
      const size_t n = std::min(size - pos, kPipelinePieceBytes);
      status = RecvPlain(target + pos, n);
      pos += n;
      absl::MutexLock lock(&shared.mu);
      if (status.ok()) shared.received = pos;
    }
    if (status.ok()) status = RecvPlain(tag, kRecordTagBytes);
    absl::MutexLock lock(&shared.mu);
    shared.error = status;
    shared.done = true;
  });
  absl::Status status;
  for (size_t pos = 0; pos < size;) {
    size_t received = 0;
    {
      absl::MutexLock lock(&shared.mu);
      const std::pair<Shared*, size_t> wait{&shared, pos};
      shared.mu.Await(absl::Condition(
          +[](const std::pair<Shared*, size_t>* w) ABSL_NO_THREAD_SAFETY_ANALYSIS {
            return w->first->received > w->second || w->first->done;
          },
          &wait));
      received = shared.received;
    }
    if (received <= pos) break;  // the read failed
    opener->Update(target + pos, received - pos);
    pos = received;
  }
  helper.Wait();
  absl::MutexLock lock(&shared.mu);
  return shared.error;
}

}  // namespace data_path_wire
}  // namespace tessera
