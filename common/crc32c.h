// CRC32C (Castagnoli, as in iSCSI) over ISA-L's crc32_iscsi, which uses SSE4.2/PCLMUL/AVX-512.
// Extend-style: Crc32c(b, Crc32c(a)) == Crc32c(a || b), and Crc32c("123456789") == 0xE3069283.
#ifndef TESSERA_COMMON_CRC32C_H_
#define TESSERA_COMMON_CRC32C_H_

#include <cstddef>
#include <cstdint>

namespace tessera {

// CRC32C of `len` bytes at `data`, continuing from `crc` (0 to start). Thread-safe.
uint32_t Crc32c(const void* data, size_t len, uint32_t crc = 0);

// The CRC32C of A || B, given crc_a = Crc32c(A), crc_b = Crc32c(B) and len_b = |B|.
uint32_t Crc32cCombine(uint32_t crc_a, uint32_t crc_b, size_t len_b);

// The CRC32C of `len` zero bytes. The CRC32C of any `len` bytes is this xor their raw CRC (the
// same polynomial with initial value 0 and no final xor), which is linear in the bytes: what a
// checksum computed in pieces elsewhere (a GPU kernel) reports.
uint32_t Crc32cOfZeros(size_t len);

// Same result as Crc32c(data, len), computed on up to `threads` threads over chunks of at least
// `min_chunk_bytes`, then combined. Small inputs run on the calling thread.
uint32_t ParallelCrc32c(const void* data, size_t len, int threads,
                        size_t min_chunk_bytes = size_t{16} << 20);

}  // namespace tessera

#endif  // TESSERA_COMMON_CRC32C_H_
