#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "agent/client.h"
#include "agent/tessera.h"
#include "common/json.h"
#include "common/version.h"

struct tessera_client {
  std::unique_ptr<tessera::Client> client;
};

namespace {

thread_local std::string last_error;

int Fail(const absl::Status& status) {
  last_error = status.ToString();
  return tessera::StatusToReturnCode(status);
}

int Return(const absl::Status& status) {
  if (status.ok()) return 0;
  return Fail(status);
}

// Copies `text` into `out` NUL-terminated. A text that does not fit is cut at a UTF-8 character
// boundary and ends in "...", so that the reader sees it was cut.
template <size_t N>
void CopyTruncated(const std::string& text, char (&out)[N]) {
  static constexpr char kEllipsis[] = "...";
  static_assert(N > sizeof(kEllipsis));
  if (text.size() < N) {
    std::memcpy(out, text.c_str(), text.size() + 1);
    return;
  }
  size_t cut = N - sizeof(kEllipsis);
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  std::memcpy(out, text.data(), cut);
  std::memcpy(out + cut, kEllipsis, sizeof(kEllipsis));
}

// The manifest as tessera.h's tessera_read_manifest describes it.
std::string ManifestJson(const tessera::ShardManifest& manifest) {
  using tessera::Json;
  Json out = Json::Object();
  out.Set("job_id", manifest.job_id());
  out.Set("rank", manifest.rank());
  out.Set("world_size", manifest.world_size());
  out.Set("step", manifest.step());
  out.Set("crc_block_bytes", manifest.crc_block_bytes());
  Json dp;
  if (manifest.has_data_parallel()) {
    const tessera::DataParallelGroup& group = manifest.data_parallel();
    dp = Json::Object();
    dp.Set("dp_rank", group.dp_rank());
    dp.Set("dp_size", group.dp_size());
    dp.Set("replicated_bytes", group.replicated_bytes());
    dp.Set("members_fingerprint",
           absl::StrCat(absl::Hex(group.members_fingerprint(), absl::kZeroPad16)));
  }
  out.Set("data_parallel", std::move(dp));
  Json entries = Json::Array();
  for (const tessera::ManifestEntry& m : manifest.entries()) {
    const tessera::EntrySpec& spec = m.spec();
    Json entry = Json::Object();
    entry.Set("name", spec.name());
    entry.Set("dtype", spec.dtype());
    entry.Set("shape", Json::ArrayOf(spec.shape()));
    entry.Set("kind", spec.kind() == tessera::ENTRY_KIND_BLOB ? "blob" : "tensor");
    entry.Set("nbytes", spec.nbytes());
    entry.Set("length", m.length());
    Json slice;
    if (spec.has_slice()) {
      slice = Json::Object();
      slice.Set("offset", spec.slice().offset());
      slice.Set("length", spec.slice().length());
    }
    entry.Set("slice", std::move(slice));
    entries.Add(std::move(entry));
  }
  out.Set("entries", std::move(entries));
  return out.Dump();
}

#define TESSERA_REQUIRE_CLIENT(c)               \
  if ((c) == nullptr || (c)->client == nullptr) \
  return Fail(absl::InvalidArgumentError("client is NULL"))

}  // namespace

extern "C" {

const char* tessera_version(void) { return tessera::kVersion; }

const char* tessera_last_error(void) { return last_error.c_str(); }

int tessera_connect(const char* socket_path, int32_t when_busy, int32_t use_gpu,
                    tessera_client** out) {
  if (socket_path == nullptr || out == nullptr) {
    return Fail(absl::InvalidArgumentError("socket_path and out must not be NULL"));
  }
  if (when_busy != TESSERA_WHEN_BUSY_SKIP && when_busy != TESSERA_WHEN_BUSY_WAIT) {
    return Fail(absl::InvalidArgumentError(absl::StrCat(
        "when_busy ", when_busy, " must be TESSERA_WHEN_BUSY_SKIP (0) or _WAIT (1)")));
  }
  tessera::Client::Options options;
  options.socket_path = socket_path;
  options.when_busy = when_busy == TESSERA_WHEN_BUSY_WAIT ? tessera::Client::BusyPolicy::kWait
                                                          : tessera::Client::BusyPolicy::kSkip;
  options.use_gpu = use_gpu != 0;
  if (const char* timeout = std::getenv("TESSERA_DP_RESTORE_TIMEOUT_MS"); timeout && *timeout) {
    int64_t ms = 0;
    if (!absl::SimpleAtoi(timeout, &ms) || ms < 1) {
      return Fail(absl::InvalidArgumentError(absl::StrCat(
          "TESSERA_DP_RESTORE_TIMEOUT_MS='", timeout, "' must be a number of milliseconds >= 1")));
    }
    options.dp_restore_timeout_ms = ms;
  }
  auto client = tessera::Client::Connect(options);
  if (!client.ok()) return Fail(client.status());
  *out = new tessera_client{std::move(*client)};
  return 0;
}

int tessera_register(tessera_client* c, const char* job_id, uint32_t rank, uint32_t world_size,
                     const tessera_entry* entries, size_t n_entries) {
  TESSERA_REQUIRE_CLIENT(c);
  if (job_id == nullptr || (entries == nullptr && n_entries > 0)) {
    return Fail(absl::InvalidArgumentError("job_id and entries must not be NULL"));
  }
  std::vector<tessera::Client::Entry> converted;
  converted.reserve(n_entries);
  for (size_t i = 0; i < n_entries; ++i) {
    const tessera_entry& e = entries[i];
    if (e.name == nullptr || e.dtype == nullptr || e.ndim < 0 || e.ndim > 64 ||
        (e.ndim > 0 && e.shape == nullptr)) {
      return Fail(absl::InvalidArgumentError(absl::StrCat(
          "entry ", i, ": name and dtype must be set, ndim in 0..64 with a shape array")));
    }
    tessera::Client::Entry entry;
    entry.spec.set_name(e.name);
    entry.spec.set_dtype(e.dtype);
    for (int32_t d = 0; d < e.ndim; ++d) entry.spec.add_shape(e.shape[d]);
    entry.spec.set_nbytes(e.nbytes);
    entry.spec.set_kind(static_cast<tessera::EntryKind>(e.kind));
    entry.data = e.data;
    entry.length = e.kind == TESSERA_ENTRY_BLOB ? e.length : e.nbytes;
    converted.push_back(std::move(entry));
  }
  return Return(c->client->Register(job_id, rank, world_size, std::move(converted)));
}

int tessera_update_entry(tessera_client* c, size_t index, void* data, uint64_t length) {
  TESSERA_REQUIRE_CLIENT(c);
  return Return(c->client->UpdateEntry(index, data, length));
}

int tessera_snapshot(tessera_client* c, int64_t step, void* stream) {
  TESSERA_REQUIRE_CLIENT(c);
  auto outcome = c->client->Snapshot(step, stream);
  if (!outcome.ok()) return Fail(outcome.status());
  return *outcome == tessera::Client::SnapshotOutcome::kSkipped ? TESSERA_SNAPSHOT_SKIPPED
                                                                 : TESSERA_SNAPSHOT_STARTED;
}

int tessera_fence(tessera_client* c, void* stream) {
  TESSERA_REQUIRE_CLIENT(c);
  return Return(c->client->Fence(stream));
}

int tessera_wait(tessera_client* c) {
  TESSERA_REQUIRE_CLIENT(c);
  return Return(c->client->Wait());
}

int tessera_restore(tessera_client* c, int64_t step, int64_t* restored_step) {
  TESSERA_REQUIRE_CLIENT(c);
  auto restored = c->client->Restore(step);
  if (!restored.ok()) return Fail(restored.status());
  if (restored_step != nullptr) *restored_step = *restored;
  return 0;
}

int tessera_entry_length(tessera_client* c, size_t index, uint64_t* length) {
  TESSERA_REQUIRE_CLIENT(c);
  const auto& entries = c->client->entries();
  if (index >= entries.size() || length == nullptr) {
    return Fail(absl::InvalidArgumentError(absl::StrCat("entry index ", index,
                                                        " must be below ", entries.size(),
                                                        " and length non-NULL")));
  }
  const auto& e = entries[index];
  *length = e.spec.kind() == tessera::ENTRY_KIND_BLOB ? e.length : e.spec.nbytes();
  return 0;
}

int tessera_get_stats(tessera_client* c, tessera_stats* out) {
  TESSERA_REQUIRE_CLIENT(c);
  if (out == nullptr) return Fail(absl::InvalidArgumentError("out is NULL"));
  tessera::Client::Stats s = c->client->stats();
  out->started = s.started;
  out->skipped = s.skipped;
  out->busy_waits = s.busy_waits;
  out->busy_wait_ns = s.busy_wait_ns;
  out->sealed = s.sealed;
  out->failed = s.failed;
  out->bytes_copied = s.bytes_copied;
  out->last_sealed_step = s.last_sealed_step;
  out->has_gpu = s.engine.rfind("cuda", 0) == 0 ? 1 : 0;
  out->bytes_staged = s.copies.bytes_staged;
  out->plan_staged_bytes = s.copies.plan_staged_bytes;
  out->plan_device_to_host_bytes = s.copies.plan_device_to_host_bytes;
  out->plan_expected_stall_ns = s.copies.plan_expected_stall_ns;
  out->window_ns = s.copies.window_ns;
  out->d2h_bytes_per_s = s.copies.d2h_bytes_per_s;
  out->d2d_bytes_per_s = s.copies.d2d_bytes_per_s;
  out->staging_buffer_bytes = s.copies.staging_buffer_bytes;
  out->staging_budget_short = s.copies.staging_budget_short;
  out->staging_alloc_failures = s.copies.staging_alloc_failures;
  out->fence_cpu_waits = s.copies.fence_cpu_waits;
  out->dp_size = s.dp_size;
  out->gathered_with_nccl = s.gathered_with_nccl ? 1 : 0;
  out->bytes_gathered = s.bytes_gathered;
  CopyTruncated(s.gather_note, out->gather_note);
  return 0;
}

int tessera_list_versions(tessera_client* c, const char* job_id, tessera_version_info* out,
                          size_t capacity, size_t* count) {
  TESSERA_REQUIRE_CLIENT(c);
  if (count == nullptr) {
    return Fail(absl::InvalidArgumentError(
        "count is NULL; pass a size_t to receive the number of versions"));
  }
  *count = 0;
  if (out == nullptr && capacity > 0) {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("out is NULL with capacity ", capacity,
                     "; pass an array of capacity tessera_version_info, or capacity 0 to only "
                     "count the versions")));
  }
  auto versions = c->client->ListVersions(job_id == nullptr ? "" : job_id);
  if (!versions.ok()) return Fail(versions.status());
  *count = versions->size();
  if (capacity == 0) return 0;
  const size_t filled = std::min(capacity, versions->size());
  for (size_t i = 0; i < filled; ++i) {
    const tessera::agent::Version& v = (*versions)[i];
    out[i].rank = v.rank();
    out[i].step = v.step();
    out[i].payload_bytes = v.payload_bytes();
    out[i].payload_crc32c = v.payload_crc32c();
    out[i].sealed = v.state() == "SEALED" ? 1 : 0;
  }
  if (filled < versions->size()) {
    return Fail(absl::OutOfRangeError(
        absl::StrCat("the daemon lists ", versions->size(), " versions but out has room for ",
                     capacity, " (the first ", capacity,
                     " were written); call again with capacity >= ", versions->size())));
  }
  return 0;
}

int tessera_set_data_parallel(tessera_client* c, const uint32_t* members, size_t n_members,
                              const uint8_t* replicated, size_t n_entries) {
  TESSERA_REQUIRE_CLIENT(c);
  if ((members == nullptr && n_members > 0) || (replicated == nullptr && n_entries > 0)) {
    return Fail(absl::InvalidArgumentError("members and replicated must not be NULL when their "
                                           "counts are not 0"));
  }
  tessera::Client::DataParallel dp;
  dp.members.assign(members, members + n_members);
  for (size_t i = 0; i < n_entries; ++i) dp.replicated.push_back(replicated[i] != 0);
  return Return(c->client->SetDataParallel(std::move(dp)));
}

int tessera_set_staging(tessera_client* c, const char* mode, uint64_t budget_bytes,
                        double budget_free_fraction) {
  TESSERA_REQUIRE_CLIENT(c);
  if (mode == nullptr) {
    return Fail(absl::InvalidArgumentError("mode is NULL; use \"off\", \"full\" or \"adaptive\""));
  }
  absl::StatusOr<tessera::cuda::StagingMode> parsed = tessera::cuda::ParseStagingMode(mode);
  if (!parsed.ok()) return Fail(parsed.status());
  return Return(c->client->SetStaging({*parsed, budget_bytes, budget_free_fraction}));
}

int tessera_read_manifest(tessera_client* c, const char* job_id, uint32_t rank, int64_t step,
                          char* json_out, size_t capacity, size_t* needed) {
  TESSERA_REQUIRE_CLIENT(c);
  if (needed != nullptr) *needed = 0;
  if (job_id == nullptr || (json_out == nullptr && capacity > 0)) {
    return Fail(absl::InvalidArgumentError(absl::StrCat(
        "job_id must not be NULL, nor json_out with capacity ", capacity)));
  }
  if (capacity > 0) json_out[0] = '\0';
  absl::StatusOr<tessera::ShardManifest> manifest = c->client->ReadManifest(job_id, rank, step);
  if (!manifest.ok()) return Fail(manifest.status());
  const std::string json = ManifestJson(*manifest);
  if (needed != nullptr) *needed = json.size() + 1;
  if (capacity <= json.size()) {
    return Fail(absl::OutOfRangeError(absl::StrCat(
        "the manifest of job '", job_id, "' rank ", rank, " step ", manifest->step(), " takes ",
        json.size() + 1, " bytes as JSON, json_out has room for ", capacity,
        "; call again with capacity >= ", json.size() + 1)));
  }
  std::memcpy(json_out, json.c_str(), json.size() + 1);
  return 0;
}

int tessera_read_range(tessera_client* c, const char* job_id, uint32_t rank, int64_t step,
                       const char* entry, uint64_t offset, uint64_t length, void* dst) {
  TESSERA_REQUIRE_CLIENT(c);
  if (job_id == nullptr || entry == nullptr) {
    return Fail(absl::InvalidArgumentError("job_id and entry must not be NULL"));
  }
  return Return(c->client->ReadRange(job_id, rank, step, entry, offset, length, dst));
}

int tessera_close(tessera_client* c, int32_t drop_snapshots) {
  if (c == nullptr) return 0;
  absl::Status status = c->client ? c->client->Close(drop_snapshots != 0) : absl::OkStatus();
  delete c;
  return Return(status);
}

}  // extern "C"
