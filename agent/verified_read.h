// What a reader of a sealed snapshot checks on its own side (Client::ReadManifest, ReadRange):
// the manifest as hostile input (a trainer writes its slot, header and manifest included), and
// each range of an entry's bytes against the manifest's block checksums, on a private copy.
#ifndef TESSERA_AGENT_VERIFIED_READ_H_
#define TESSERA_AGENT_VERIFIED_READ_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "proto/manifest.pb.h"

namespace tessera {

// Checks what the layout check (Client::VerifyLayout: offsets, block checksums, payload CRC32C)
// does not: that `manifest` is of (job_id, rank, step), that rank < world_size, and of each
// entry that its name is 1..256 bytes without control characters and unique, its kind a tensor
// or a blob, its slice (tensors only) within its nbytes, and its length within the bytes the
// shard stores of it (exactly those for a tensor). kDataLoss names the first problem.
absl::Status CheckReadableManifest(const ShardManifest& manifest, const std::string& job_id,
                                   uint32_t rank, int64_t step);

// Copies bytes [offset, offset + length) of an entry from memory that another process may
// rewrite at any time (the slot of a live trainer) into `dst`, then checks every CRC32C block
// that overlaps the range on the copy, so that bytes changed before, during or after the copy
// fail the check instead of being returned. A block the range covers only in part is
// checksummed whole: its bytes outside the range go through a small buffer of this call's own.
//
// `entry` holds the entry's `entry_length` stored bytes, in blocks of `block_bytes` (the last
// one shorter) whose CRC32C are `block_crc32c`. REQUIRES: block_bytes > 0, one checksum per
// block, and the range within [0, entry_length) (the caller checked the manifest and the
// request). kDataLoss names the first block that does not match (its index and bytes within the
// entry); `dst` then holds unverified bytes.
absl::Status CopyVerifiedRange(const uint8_t* entry, uint64_t entry_length, uint64_t block_bytes,
                               absl::Span<const uint32_t> block_crc32c, uint64_t offset,
                               uint64_t length, void* dst);

}  // namespace tessera

#endif  // TESSERA_AGENT_VERIFIED_READ_H_
