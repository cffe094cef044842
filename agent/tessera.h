/* Tessera's C ABI, exported by libtessera.so. Used directly from C/C++ trainers and through
 * ctypes by the Python package.
 *
 * Every function returns 0 on success or a negative canonical status code (-3 invalid argument,
 * -5 not found, -9 failed precondition, -14 unavailable, -15 data loss, ...); then
 * tessera_last_error() returns the message on the calling thread. tessera_snapshot returns 1
 * when the snapshot was skipped because the previous one was still in flight.
 *
 * Thread-safety: a client is used from one training thread; different clients are independent. */
#ifndef TESSERA_AGENT_TESSERA_H_
#define TESSERA_AGENT_TESSERA_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tessera_client tessera_client;

enum { TESSERA_ENTRY_TENSOR = 1, TESSERA_ENTRY_BLOB = 2 };
enum { TESSERA_WHEN_BUSY_SKIP = 0, TESSERA_WHEN_BUSY_WAIT = 1 };
enum { TESSERA_SNAPSHOT_STARTED = 0, TESSERA_SNAPSHOT_SKIPPED = 1 };
enum { TESSERA_GATHER_NOTE_BYTES = 256 };

typedef struct {
  const char* name;
  const char* dtype;     /* "float32", "bfloat16", ..., "bytes" for blobs */
  const int64_t* shape;  /* ndim dimensions; may be NULL when ndim is 0 */
  int32_t ndim;
  int32_t kind;          /* TESSERA_ENTRY_TENSOR or TESSERA_ENTRY_BLOB */
  uint64_t nbytes;       /* tensor bytes, or a blob's capacity */
  void* data;            /* host or device memory, owned by the caller */
  uint64_t length;       /* a blob's valid bytes; ignored for tensors */
} tessera_entry;

typedef struct {
  uint64_t started;
  uint64_t skipped;
  uint64_t busy_waits;
  uint64_t busy_wait_ns;
  uint64_t sealed;
  uint64_t failed;
  uint64_t bytes_copied;
  int64_t last_sealed_step;
  int32_t has_gpu;
  /* GPU staging (tessera_set_staging): bytes staged device-to-device in all; the last
   * snapshot's plan (bytes staged of the device-to-host bytes, expected fence stall in ns, -1
   * unknown); the measurements it used (-1 unknown); the buffer's size; snapshots whose plan
   * wanted more than the budget; buffers the device could not allocate. */
  uint64_t bytes_staged;
  uint64_t plan_staged_bytes;
  uint64_t plan_device_to_host_bytes;
  int64_t plan_expected_stall_ns;
  int64_t window_ns;
  double d2h_bytes_per_s;
  double d2d_bytes_per_s;
  uint64_t staging_buffer_bytes;
  uint64_t staging_budget_short;
  uint64_t staging_alloc_failures;
  uint64_t fence_cpu_waits; /* fences that waited on the CPU for the copies to be issued */
  /* The last DP-sharded restore: the group's size (0: none), the bytes of the other members'
   * slices gathered, and 1 when they came over NCCL (0: read through the daemon). */
  uint32_t dp_size;
  int32_t gathered_with_nccl;
  uint64_t bytes_gathered;
  /* Why that restore read the slices through the daemon instead of NCCL, as NUL-terminated
   * UTF-8 (longer notes are cut, ending in "..."); "" when NCCL was used or no DP-sharded
   * restore happened. New fields go after this one: the struct only ever grows at its end. */
  char gather_note[TESSERA_GATHER_NOTE_BYTES];
} tessera_stats;

/* One snapshot the daemon holds (tessera_list_versions). It does not say which job it belongs
 * to. */
typedef struct {
  uint32_t rank;
  int64_t step;
  uint64_t payload_bytes;  /* the stored payload: the entries' slots and the manifest */
  uint32_t payload_crc32c; /* the payload's CRC32C; meaningful once sealed */
  int32_t sealed;          /* 1: sealed, restorable; 0: still being written */
} tessera_version_info;

const char* tessera_version(void);
const char* tessera_last_error(void);

/* when_busy: TESSERA_WHEN_BUSY_SKIP or TESSERA_WHEN_BUSY_WAIT. use_gpu 0 forces host copies. */
int tessera_connect(const char* socket_path, int32_t when_busy, int32_t use_gpu,
                    tessera_client** out);
int tessera_register(tessera_client* client, const char* job_id, uint32_t rank,
                     uint32_t world_size, const tessera_entry* entries, size_t n_entries);
int tessera_update_entry(tessera_client* client, size_t index, void* data, uint64_t length);
/* stream: a cudaStream_t, or NULL for the default stream. */
int tessera_snapshot(tessera_client* client, int64_t step, void* stream);
int tessera_fence(tessera_client* client, void* stream);
int tessera_wait(tessera_client* client);
/* step -1: the newest sealed step. *restored_step receives the step restored. */
int tessera_restore(tessera_client* client, int64_t step, int64_t* restored_step);
int tessera_entry_length(tessera_client* client, size_t index, uint64_t* length);
int tessera_get_stats(tessera_client* client, tessera_stats* out);
/* The snapshots the daemon holds for job_id, sorted by (rank, step). job_id NULL or "": the job
 * of this client's last tessera_register that reached the daemon (accepted or not); before one,
 * every job on the daemon, sorted by job first (tell them apart by listing one job at a time).
 * A job_id the daemon does not accept (1..128 bytes of letters, digits, '.', '_', '-', not
 * starting with '.') is -3. An unknown job has no versions.
 * *count receives the number of versions (0 when the daemon could not be asked). capacity 0 only
 * counts them (out may then be NULL) and returns 0. A capacity below the count fills all of out
 * with the first versions and returns -11 (out of range), the message naming the count needed;
 * versions come and go between two calls, so call again with capacity *count until it fits. */
int tessera_list_versions(tessera_client* client, const char* job_id, tessera_version_info* out,
                          size_t capacity, size_t* count);
/* GPU staging of the snapshots started from now on. mode: "off" (the fence waits for the whole
 * device-to-host copy), "full" (stage every byte the budget allows) or "adaptive" (the default:
 * stage the fewest bytes that keep the fence from stalling, from measurements). budget_bytes: GPU
 * memory the staging buffer may take; 0 means budget_free_fraction (in (0, 1]) of the free device
 * memory. Ignored without a GPU. */
int tessera_set_staging(tessera_client* client, const char* mode, uint64_t budget_bytes,
                        double budget_free_fraction);
/* Data parallelism, taking effect at the next tessera_register: members are the job ranks of
 * this rank's data-parallel group in DP-rank order (this rank among them); replicated[i] != 0
 * marks entry i of the entries about to be registered as replicated across the group (tensors
 * only). Each member then snapshots a disjoint, balanced slice of the replicated bytes, and
 * tessera_restore, called by every member together, gathers the other slices (over NCCL when
 * the tensors are GPU memory and every member can load libnccl; through the daemon otherwise).
 * n_members 0 turns it off. A restore waits for the other members for at most
 * TESSERA_DP_RESTORE_TIMEOUT_MS (read by tessera_connect; default 300000). */
int tessera_set_data_parallel(tessera_client* client, const uint32_t* members, size_t n_members,
                              const uint8_t* replicated, size_t n_entries);
/* Reading a sealed snapshot of any rank without registering it: the client need not have
 * registered anything, and the rank's trainer may keep running and snapshotting. The daemon
 * answers for a job of the caller's uid (root: any job; for another uid, some rank of the job
 * must be registered on that daemon under it at the time, else -9); another uid's job is -7.
 * What is verified, and how: agent/client.h, Client::ReadManifest and Client::ReadRange.
 *
 * tessera_read_manifest writes the manifest of (job_id, rank, step), step -1 being the newest
 * sealed step, into json_out as NUL-terminated UTF-8 JSON, one object:
 *   {"job_id": "...", "rank": R, "world_size": W, "step": S (the step read), "crc_block_bytes": B,
 *    "data_parallel": null or {"dp_rank": D, "dp_size": N, "replicated_bytes": X,
 *                              "members_fingerprint": "16 hex digits"},
 *    "entries": [{"name": "...", "dtype": "...", "shape": [...], "kind": "tensor" or "blob",
 *                 "nbytes": tensor bytes or blob capacity, "length": the valid stored bytes,
 *                 "slice": null or {"offset": O, "length": L}}, ...]}
 * indented, with the entries in the snapshot's order; numbers are integers, up to 2^64 - 1
 * (beyond a double's 2^53: parse them as integers). *needed (when not NULL) receives the bytes
 * the JSON takes, its NUL included. A capacity below that writes "" (when capacity > 0) and
 * returns -11 (out of range): call again with capacity *needed (json_out may be NULL with
 * capacity 0). Not found -5, no longer verifiable -15.
 *
 * tessera_read_range copies bytes [offset, offset + length) of entry `entry`'s stored bytes in
 * step `step` (>= 0) of (job_id, rank) into dst (host memory), each block checked after the copy.
 * The stored bytes are the manifest entry's "length" bytes: of an entry with a "slice", that
 * slice of the tensor (offset 0 is its first byte). A range outside them is -3; an unknown entry
 * or step -5; bytes that do not verify, here and then on the daemon, -15 (dst then holds
 * unverified bytes). The opened snapshot is kept for the next reads of the same step. */
int tessera_read_manifest(tessera_client* client, const char* job_id, uint32_t rank,
                          int64_t step, char* json_out, size_t capacity, size_t* needed);
int tessera_read_range(tessera_client* client, const char* job_id, uint32_t rank, int64_t step,
                       const char* entry, uint64_t offset, uint64_t length, void* dst);
/* Unregisters (dropping the snapshots when drop_snapshots != 0) and frees the client. */
int tessera_close(tessera_client* client, int32_t drop_snapshots);

#ifdef __cplusplus
}
#endif

#endif /* TESSERA_AGENT_TESSERA_H_ */
