#include "common/crc32c.h"

#include <algorithm>
#include <climits>
#include <thread>
#include <vector>

#include "isa-l/crc.h"

namespace tessera {
namespace {

constexpr uint32_t kCastagnoliReflected = 0x82F63B78u;

uint32_t Gf2MatrixTimes(const uint32_t* matrix, uint32_t vec) {
  uint32_t sum = 0;
  for (; vec != 0; vec >>= 1, ++matrix) {
    if (vec & 1) sum ^= *matrix;
  }
  return sum;
}

void Gf2MatrixSquare(uint32_t* square, const uint32_t* matrix) {
  for (int n = 0; n < 32; ++n) square[n] = Gf2MatrixTimes(matrix, matrix[n]);
}

}  // namespace

uint32_t Crc32c(const void* data, size_t len, uint32_t crc) {
  auto* p = static_cast<unsigned char*>(const_cast<void*>(data));
  crc = ~crc;
  // crc32_iscsi takes an int length.
  constexpr size_t kMaxCall = size_t{1} << 30;
  while (len > 0) {
    size_t n = std::min(len, kMaxCall);
    crc = crc32_iscsi(p, static_cast<int>(n), crc);
    p += n;
    len -= n;
  }
  return ~crc;
}

// Appending len_b zero bits to A is a linear operator on the CRC register; apply it by repeated
// squaring of the one-zero-bit operator, then xor in crc_b (zlib's crc32_combine method).
uint32_t Crc32cCombine(uint32_t crc_a, uint32_t crc_b, size_t len_b) {
  if (len_b == 0) return crc_a;
  uint32_t even[32];
  uint32_t odd[32];
  odd[0] = kCastagnoliReflected;
  uint32_t row = 1;
  for (int n = 1; n < 32; ++n, row <<= 1) odd[n] = row;
  Gf2MatrixSquare(even, odd);  // two zero bits
  Gf2MatrixSquare(odd, even);  // four zero bits
  do {
    Gf2MatrixSquare(even, odd);
    if (len_b & 1) crc_a = Gf2MatrixTimes(even, crc_a);
    len_b >>= 1;
    if (len_b == 0) break;
    Gf2MatrixSquare(odd, even);
    if (len_b & 1) crc_a = Gf2MatrixTimes(odd, crc_a);
    len_b >>= 1;
  } while (len_b != 0);
  return crc_a ^ crc_b;
}

uint32_t ParallelCrc32c(const void* data, size_t len, int threads, size_t min_chunk_bytes) {
  if (min_chunk_bytes == 0) min_chunk_bytes = 1;
  size_t chunks = std::min<size_t>(std::max(threads, 1), std::max<size_t>(len / min_chunk_bytes, 1));
  if (chunks <= 1) return Crc32c(data, len);
  const auto* base = static_cast<const uint8_t*>(data);
  size_t chunk_bytes = (len + chunks - 1) / chunks;
  std::vector<uint32_t> crcs(chunks);
  std::vector<size_t> lens(chunks);
  std::vector<std::thread> workers;
  for (size_t i = 0; i < chunks; ++i) {
    size_t begin = i * chunk_bytes;
    lens[i] = begin >= len ? 0 : std::min(chunk_bytes, len - begin);
    if (i == 0) continue;
    workers.emplace_back([&, i, begin] { crcs[i] = Crc32c(base + begin, lens[i]); });
  }
  crcs[0] = Crc32c(base, lens[0]);
  for (auto& w : workers) w.join();
  uint32_t crc = crcs[0];
  for (size_t i = 1; i < chunks; ++i) crc = Crc32cCombine(crc, crcs[i], lens[i]);
  return crc;
}

}  // namespace tessera
