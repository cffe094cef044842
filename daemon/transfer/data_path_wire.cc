// Io's sealed sends and opened reads (data_path_wire.h): the record layer of data path version 2.
#include "daemon/transfer/data_path_wire.h"

#include <cstring>
#include <vector>

namespace tessera {
namespace data_path_wire {
namespace {

// Bytes encrypted (or decrypted) between two socket calls: small enough that they are still in
// the cache when the kernel copies them, large enough that a chunk costs few system calls.
constexpr size_t kCipherPieceBytes = size_t{256} << 10;
// A buffered record's plaintext larger than this is given back once read.
constexpr size_t kKeptBufferBytes = size_t{1} << 20;

}  // namespace

absl::Status Io::SendSealed(const iovec* iov, int count) {
  // Records are built in one buffer per thread and sent as it fills: the header, the ciphertext
  // in pieces, the tag; several small records (a frame's length and its message) go out in one
  // send.
  thread_local std::vector<uint8_t> out(kCipherPieceBytes);
  size_t used = 0;
  auto flush = [&]() -> absl::Status {
    if (used == 0) return absl::OkStatus();
    iovec v{out.data(), used};
    used = 0;
    return SendPlain(&v, 1);
  };
  for (int i = 0; i < count; ++i) {
    const auto* p = static_cast<const uint8_t*>(iov[i].iov_base);
    size_t left = iov[i].iov_len;
    while (left > 0) {
      const size_t record = std::min(left, kMaxRecordBytes);
      if (out.size() - used < kRecordHeaderBytes) TESSERA_RETURN_IF_ERROR(flush());
      TESSERA_RETURN_IF_ERROR(sealer->Begin(record, out.data() + used));
      used += kRecordHeaderBytes;
      for (size_t pos = 0; pos < record;) {
        if (used == out.size()) TESSERA_RETURN_IF_ERROR(flush());
        const size_t n = std::min(record - pos, out.size() - used);
        sealer->Update(p + pos, out.data() + used, n);
        used += n;
        pos += n;
      }
      if (out.size() - used < kRecordTagBytes) TESSERA_RETURN_IF_ERROR(flush());
      TESSERA_RETURN_IF_ERROR(sealer->Finish(out.data() + used));
      used += kRecordTagBytes;
      p += record;
      left -= record;
    }
  }
  return flush();
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
    if (direct) {
      dst += *record;
      size -= *record;
    }
  }
  return absl::OkStatus();
}

}  // namespace data_path_wire
}  // namespace tessera
