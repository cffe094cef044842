// Io's sealed sends and opened reads (data_path_wire.h): the record layer of data path version 2.
#include "daemon/transfer/data_path_wire.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "common/crc32c.h"
#include "daemon/store/fragment_store.h"
#include "daemon/transfer/cipher_pool.h"
#include "daemon/transfer/data_path.h"

namespace tessera {
namespace data_path_wire {
namespace {

// Bytes encrypted (or decrypted) between two socket calls: small enough that they are still in
// the cache when the kernel copies them, large enough that a chunk costs few system calls.
constexpr size_t kCipherPieceBytes = size_t{256} << 10;
// A buffered record's plaintext larger than this is given back once read.
constexpr size_t kKeptBufferBytes = size_t{1} << 20;

// Ranges (sending) and reads (receiving) this large are sealed and opened on the cipher pool's
// threads (cipher_pool.h): one core's AES-GCM runs at about the rate of one TCP stream, so a
// connection whose own thread did the cipher would move a chunk at half of either.
constexpr size_t kParallelBytes = size_t{256} << 10;
// What a sender cuts a range's chunks into there (SealedRecordBytes): records of 256 KiB are
// sealed in about 0.1 ms (a pool thread's turn costs a few microseconds), and a chunk of 1 MiB
// (the default) spreads over four threads.
constexpr size_t kDefaultSealedRecordBytes = size_t{256} << 10;
constexpr size_t kMaxSealedRecordBytes = size_t{4} << 20;
std::atomic<size_t> sealed_record_bytes{kDefaultSealedRecordBytes};
constexpr int kWaitKinds = 5;
std::atomic<uint64_t> wait_ns[kWaitKinds];
std::atomic<uint64_t> longest_wait_ns[kWaitKinds];

uint64_t Nanoseconds(absl::Duration d) {
  return static_cast<uint64_t>(std::max<int64_t>(0, absl::ToInt64Nanoseconds(d)));
}
// A receiver opens records at least this large on the pool, except the last one of a read, which
// it opens itself as it arrives (it would wait for it otherwise); smaller ones on its own thread.
constexpr size_t kMinParallelRecordBytes = size_t{32} << 10;
// Chunks sent sealed on the pool are at least this large: a receiver checks a chunk only once all
// its records have been opened, so each chunk costs it a wait for the last of them.
constexpr size_t kSealedChunkBytes = size_t{4} << 20;

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

void AddWait(WaitKind kind, absl::Duration waited) {
  const uint64_t ns = Nanoseconds(waited);
  const int k = static_cast<int>(kind);
  wait_ns[k].fetch_add(ns, std::memory_order_relaxed);
  uint64_t longest = longest_wait_ns[k].load(std::memory_order_relaxed);
  while (ns > longest &&
         !longest_wait_ns[k].compare_exchange_weak(longest, ns, std::memory_order_relaxed)) {
  }
}

absl::Status Io::SendSealed(const iovec* iov, int count) {
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

absl::Status Io::SendChunks(const uint8_t* data, uint64_t begin, uint64_t end, size_t chunk_bytes,
                            uint32_t* range_crc32c) {
  if (sealer != nullptr && end - begin >= kParallelBytes && CipherPool::Shared().threads() > 1) {
    return SendChunksSealedInParallel(data, begin, end, chunk_bytes, range_crc32c);
  }
  uint32_t crc = 0;
  for (uint64_t pos = begin; pos < end;) {
    ChunkHeader chunk;
    chunk.offset = pos;
    chunk.size = static_cast<uint32_t>(std::min<uint64_t>(chunk_bytes, end - pos));
    chunk.crc32c = Crc32c(data + pos, chunk.size);
    crc = pos == begin ? chunk.crc32c : Crc32cCombineCached(crc, chunk.crc32c, chunk.size);
    TESSERA_RETURN_IF_ERROR(SendChunk(chunk, data + pos));
    pos += chunk.size;
  }
  if (range_crc32c != nullptr) *range_crc32c = crc;
  return absl::OkStatus();
}

absl::Status Io::SendChunksSealedInParallel(const uint8_t* data, uint64_t begin, uint64_t end,
                                            size_t chunk_bytes, uint32_t* range_crc32c) {
  // The stream is what SendChunk would send chunk by chunk: each chunk's header in a record of
  // its own, then its bytes in records of SealedRecordBytes(). The pool seals them (a header's
  // job computes its chunk's CRC32C first) into a ring of buffers, and this thread sends them
  // in order, each buffer sealed again as soon as it has been sent.
  chunk_bytes = std::max(chunk_bytes, kSealedChunkBytes);
  const size_t record_bytes = SealedRecordBytes();
  struct Record {
    const uint8_t* in = nullptr;  // nullptr: the header of chunks[chunk]
    size_t size = 0;
    size_t chunk = 0;
  };
  std::vector<ChunkHeader> chunks;
  std::vector<Record> records;
  for (uint64_t pos = begin; pos < end;) {
    ChunkHeader chunk;
    chunk.offset = pos;
    chunk.size = static_cast<uint32_t>(std::min<uint64_t>(chunk_bytes, end - pos));
    records.push_back(Record{nullptr, kChunkHeaderBytes, chunks.size()});
    for (size_t k = 0; k < chunk.size; k += record_bytes) {
      records.push_back(Record{data + pos + k, std::min<size_t>(record_bytes, chunk.size - k), 0});
    }
    chunks.push_back(chunk);
    pos += chunk.size;
  }
  TESSERA_ASSIGN_OR_RETURN(const uint64_t first, sealer->Reserve(records.size()));
  CipherPool& pool = CipherPool::Shared();
  const size_t slots = std::min(records.size(), 2 * static_cast<size_t>(pool.threads()));
  const size_t kSlotBytes = kRecordHeaderBytes + record_bytes + kRecordTagBytes;
  std::vector<std::unique_ptr<uint8_t[]>> buffers;
  for (size_t i = 0; i < slots; ++i) buffers.push_back(pool.TakeBuffer(kSlotBytes));

  absl::Mutex mu;
  absl::CondVar changed;
  std::vector<size_t> sealed_in_slot(slots, records.size());  // which record each slot holds
  size_t outstanding = 0;
  const std::string& key = sealer->key();
  auto seal = [&](size_t j) {
    {
      absl::MutexLock lock(&mu);
      ++outstanding;
    }
    pool.Run([&, j] {
      const Record& record = records[j];
      uint8_t* out = buffers[j % slots].get();
      if (record.in == nullptr) {
        ChunkHeader& chunk = chunks[record.chunk];
        chunk.crc32c = Crc32c(data + chunk.offset, chunk.size);
        uint8_t encoded[kChunkHeaderBytes];
        chunk.Encode(encoded);
        SealRecordAt(key, first + j, encoded, sizeof(encoded), out);
      } else {
        SealRecordAt(key, first + j, record.in, record.size, out);
      }
      absl::MutexLock lock(&mu);
      sealed_in_slot[j % slots] = j;
      --outstanding;
      changed.SignalAll();
    });
  };
  for (size_t j = 0; j < slots; ++j) seal(j);
  absl::Status status;
  std::vector<iovec> iov(slots);
  for (size_t j = 0; j < records.size() && status.ok();) {
    // Sends record j and every record sealed in order after it, in one call.
    size_t ready = 0;
    {
      absl::MutexLock lock(&mu);
      if (sealed_in_slot[j % slots] != j) {
        const absl::Time waiting = absl::Now();
        while (sealed_in_slot[j % slots] != j) changed.Wait(&mu);
        AddWait(WaitKind::kSeal, absl::Now() - waiting);
      }
      while (ready < slots && j + ready < records.size() &&
             sealed_in_slot[(j + ready) % slots] == j + ready) {
        ++ready;
      }
    }
    for (size_t k = 0; k < ready; ++k) {
      iov[k].iov_base = buffers[(j + k) % slots].get();
      iov[k].iov_len = kRecordHeaderBytes + records[j + k].size + kRecordTagBytes;
    }
    status = SendPlain(iov.data(), static_cast<int>(ready));
    for (size_t k = 0; k < ready && status.ok(); ++k) {
      if (j + k + slots < records.size()) seal(j + k + slots);
    }
    j += ready;
  }
  {
    absl::MutexLock lock(&mu);  // the jobs use this frame's buffers and records
    while (outstanding > 0) changed.Wait(&mu);
  }
  for (std::unique_ptr<uint8_t[]>& buffer : buffers) pool.GiveBuffer(std::move(buffer), kSlotBytes);
  TESSERA_RETURN_IF_ERROR(status);
  if (range_crc32c != nullptr) {
    uint32_t crc = chunks[0].crc32c;
    for (size_t c = 1; c < chunks.size(); ++c) {
      crc = Crc32cCombineCached(crc, chunks[c].crc32c, chunks[c].size);
    }
    *range_crc32c = crc;
  }
  return absl::OkStatus();
}

absl::Status Io::RecvChecked(uint8_t* dst, size_t size, uint32_t* crc32c) {
  if (opener != nullptr) return RecvOpened(dst, size, crc32c);
  TESSERA_RETURN_IF_ERROR(RecvPlain(dst, size));
  *crc32c = Crc32c(dst, size);
  return absl::OkStatus();
}

namespace {

// The pool that opens a read of `size` bytes: none for small reads, or where it has one thread.
CipherPool* PoolFor(size_t size) {
  if (size < kParallelBytes) return nullptr;
  CipherPool* pool = &CipherPool::Shared();
  return pool->threads() < 2 ? nullptr : pool;
}

uint32_t CombinePieces(const std::deque<Io::CrcPiece>& pieces) {
  uint32_t crc = 0;
  bool first = true;
  for (const Io::CrcPiece& piece : pieces) {
    crc = first ? piece.crc32c : Crc32cCombineCached(crc, piece.crc32c, piece.bytes);
    first = false;
  }
  return crc;
}

}  // namespace

absl::Status Io::RecvStart(uint8_t* dst, size_t size, PendingRecv* pending) {
  if (opener == nullptr) {
    TESSERA_RETURN_IF_ERROR(RecvPlain(dst, size));
    pending->crcs.push_back(CrcPiece{Crc32c(dst, size), size});
    return absl::OkStatus();
  }
  return RecvRecords(dst, size, PoolFor(size), &pending->jobs, &pending->crcs,
                     /*open_last_here=*/false);
}

absl::StatusOr<uint32_t> Io::RecvFinish(PendingRecv* pending) {
  uint64_t sequence = 0;
  size_t bytes = 0;
  const absl::Time waiting = absl::Now();
  const bool opened = pending->jobs.Wait(&sequence, &bytes);
  AddWait(WaitKind::kOpen, absl::Now() - waiting);
  if (!opened) {
    opener->buffer().clear();
    return opener->Failed(sequence, bytes);
  }
  return CombinePieces(pending->crcs);
}

absl::Status Io::RecvOpened(uint8_t* dst, size_t size, uint32_t* crc32c) {
  // Records that land where they go and are large enough are opened on the cipher pool while
  // this thread reads the next; none of the bytes is handed back before every record
  // authenticated.
  PendingRecv pending;
  absl::Status status = RecvRecords(dst, size, PoolFor(size), &pending.jobs,
                                    crc32c != nullptr ? &pending.crcs : nullptr,
                                    /*open_last_here=*/true);
  absl::StatusOr<uint32_t> crc = RecvFinish(&pending);
  if (!crc.ok()) return crc.status();
  TESSERA_RETURN_IF_ERROR(status);
  if (crc32c != nullptr) *crc32c = *crc;
  return absl::OkStatus();
}

absl::Status Io::RecvRecords(uint8_t* dst, size_t size, CipherPool* pool, CipherJobs* jobs,
                             std::deque<CrcPiece>* crcs, bool open_last_here) {
  std::vector<uint8_t>& buffer = opener->buffer();
  uint8_t header[kRecordHeaderBytes];
  bool have_header = false;  // read with the record before
  while (size > 0) {
    if (opener->buffer_offset < buffer.size()) {
      const size_t n = std::min(size, buffer.size() - opener->buffer_offset);
      std::memcpy(dst, buffer.data() + opener->buffer_offset, n);
      if (crcs != nullptr) crcs->push_back(CrcPiece{Crc32c(dst, n), n});
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
    if (!have_header) TESSERA_RETURN_IF_ERROR(RecvPlain(header, sizeof(header)));
    have_header = false;
    const size_t declared = GetU32(header);
    if (pool != nullptr && declared >= kMinParallelRecordBytes &&
        (declared < size || (declared == size && !open_last_here))) {
      uint64_t sequence = 0;
      absl::StatusOr<size_t> record = opener->BeginAt(header, &sequence);
      if (!record.ok()) return record.status();
      struct Job {
        const std::string* key;
        uint64_t sequence;
        uint8_t* data;
        size_t size;
        CrcPiece* crc;  // nullptr: not asked for (a deque's elements stay where they are)
        uint8_t tag[kRecordTagBytes];
      } job{&opener->key(), sequence, dst, *record, nullptr, {}};
      // The record's bytes and tag, and the next record's header when more of this read is to
      // come (a record must follow then), in one call.
      const bool more = *record < size;
      iovec iov[3] = {{dst, *record}, {job.tag, sizeof(job.tag)}, {header, sizeof(header)}};
      TESSERA_RETURN_IF_ERROR(RecvPlainV(iov, more ? 3 : 2));
      have_header = more;
      if (crcs != nullptr) {
        crcs->push_back(CrcPiece{0, *record});
        job.crc = &crcs->back();
      }
      jobs->Add();
      pool->Run(
          [job, jobs] {
            const bool ok = OpenRecordAt(*job.key, job.sequence, job.data, job.size, job.tag);
            if (ok && job.crc != nullptr) job.crc->crc32c = Crc32c(job.data, job.size);
            jobs->Done(ok, job.sequence, job.size);
          },
          /*urgent=*/true);
      dst += *record;
      size -= *record;
      continue;
    }
    absl::StatusOr<size_t> record = opener->Begin(header);
    if (!record.ok()) return record.status();
    // A record that fits what is asked for is read and decrypted where it goes (a chunk into
    // its fragment's memory); a longer one through the buffer.
    const bool direct = *record <= size;
    if (!direct) buffer.resize(*record);
    uint8_t* target = direct ? dst : buffer.data();
    for (size_t pos = 0; pos < *record;) {
      const size_t n = std::min(*record - pos, kCipherPieceBytes);
      TESSERA_RETURN_IF_ERROR(RecvPlain(target + pos, n));
      opener->Update(target + pos, n);
      pos += n;
    }
    uint8_t tag[kRecordTagBytes];
    TESSERA_RETURN_IF_ERROR(RecvPlain(tag, sizeof(tag)));
    if (absl::Status s = opener->Finish(tag); !s.ok()) {
      buffer.clear();
      return s;
    }
    if (direct && crcs != nullptr) crcs->push_back(CrcPiece{Crc32c(dst, *record), *record});
    if (direct) {
      dst += *record;
      size -= *record;
    }
  }
  return absl::OkStatus();
}

}  // namespace data_path_wire

DataPathWaits DataPathWaitTotals() {
  using data_path_wire::longest_wait_ns;
  using data_path_wire::wait_ns;
  return DataPathWaits{wait_ns[0].load(),         wait_ns[1].load(),
                       wait_ns[2].load(),         wait_ns[3].load(),
                       wait_ns[4].load(),         longest_wait_ns[0].load(),
                       longest_wait_ns[1].load(), longest_wait_ns[2].load(),
                       longest_wait_ns[3].load(), longest_wait_ns[4].load()};
}

void ResetLongestDataPathWaits() {
  for (std::atomic<uint64_t>& longest : data_path_wire::longest_wait_ns) longest.store(0);
}

void SetSealedRecordBytes(size_t bytes) {
  data_path_wire::sealed_record_bytes.store(std::clamp(
      bytes, data_path_wire::kMinParallelRecordBytes, data_path_wire::kMaxSealedRecordBytes));
}

size_t SealedRecordBytes() { return data_path_wire::sealed_record_bytes.load(); }

}  // namespace tessera
