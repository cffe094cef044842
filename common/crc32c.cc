#include "common/crc32c.h"

#include <algorithm>
#include <climits>
#include <thread>
#include <vector>

#include "isa-l/crc.h"

namespace tessera {
namespace {

constexpr uint32_t kCastagnoliReflected = 0x82F63B78u;

// Polynomials over GF(2) modulo the CRC polynomial, in the CRC's reflected bit order: bit 31 is
// x^0. (The method of zlib 1.2.12's crc32_combine: appending n zero bytes to A multiplies its CRC
// register by x^(8n).)
uint32_t MultiplyModP(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t m = uint32_t{1} << 31; m != 0; m >>= 1) {
    if (a & m) product ^= b;
    b = (b & 1) ? (b >> 1) ^ kCastagnoliReflected : b >> 1;
  }
  return product;
}

// kPowers[k] = x^(2^k) mod P, for k = 0..66: enough for x^(8n) with any 64-bit n.
struct PowerTable {
  uint32_t powers[67];
  PowerTable() {
    powers[0] = uint32_t{1} << 30;  // x^1
    for (int k = 1; k < 67; ++k) powers[k] = MultiplyModP(powers[k - 1], powers[k - 1]);
  }
};

// x^(8 * bytes) mod P.
uint32_t XPowerOfBytes(uint64_t bytes) {
  static const PowerTable table;
  uint32_t result = uint32_t{1} << 31;  // x^0
  for (int k = 3; bytes != 0; bytes >>= 1, ++k) {
    if (bytes & 1) result = MultiplyModP(table.powers[k], result);
  }
  return result;
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

// Appending len_b zero bytes to A multiplies its CRC register by x^(8 len_b); then xor in B's.
// About 64 32-step loops at most (a microsecond), whatever len_b is.
uint32_t Crc32cCombine(uint32_t crc_a, uint32_t crc_b, size_t len_b) {
  if (len_b == 0) return crc_a;
  return MultiplyModP(XPowerOfBytes(len_b), crc_a) ^ crc_b;
}

uint32_t Crc32cOfZeros(size_t len) {
  // crc(0^n) = ~(~0 * x^(8n)): the register starts at ~0, zeros only shift it, and the result is
  // inverted; Crc32cCombine(~0, ~0, n) computes exactly that.
  return len == 0 ? 0 : Crc32cCombine(~uint32_t{0}, ~uint32_t{0}, len);
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
