#include "agent/client.h"

#include <algorithm>
#include <limits>
#include <chrono>
#include <functional>
#include <map>
#include <random>
#include <set>

#include "absl/time/clock.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "agent/block_verifier.h"
#include "agent/verified_read.h"
#include "common/crc32c.h"
#include "common/grpc_status.h"
#include "common/logging.h"
#include "common/status.h"
#include "cuda/nccl_group.h"
#include "grpcpp/create_channel.h"

namespace tessera {
namespace {

// Calls `call` again, every 250 ms, while it answers kUnavailable (a daemon that cannot decide
// or reach what it needs yet), for up to timeout_ms; returns its last answer.
absl::Status WhileUnavailable(int64_t timeout_ms, const std::function<absl::Status()>& call) {
  const absl::Time give_up = absl::Now() + absl::Milliseconds(timeout_ms);
  while (true) {
    absl::Status status = call();
    if (!absl::IsUnavailable(status) || absl::Now() >= give_up) return status;
    absl::SleepFor(absl::Milliseconds(250));
  }
}

// Bytes to copy: a tensor's whole size, a blob's currently valid length.
uint64_t EntryLength(const Client::Entry& e) {
  return e.spec.kind() == ENTRY_KIND_BLOB ? e.length : e.spec.nbytes();
}

cuda::CopyEngineOptions EngineOptions(const Client::Options& options) {
  cuda::CopyEngineOptions engine;
  engine.staging = options.staging;
  engine.checksum_threads = options.checksum_threads;
  engine.checksum_on_device = options.checksum_on_device;
  return engine;
}

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string Describe(const EntrySpec& s) {
  return absl::StrCat(s.dtype(), "[", absl::StrJoin(s.shape(), ","), "] ", s.nbytes(), " bytes",
                      s.kind() == ENTRY_KIND_BLOB ? " (blob)" : "");
}

}  // namespace

int StatusToReturnCode(const absl::Status& status) {
  return status.ok() ? 0 : -static_cast<int>(status.code());
}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(const Options& options) {
  if (options.socket_path.empty()) {
    return absl::InvalidArgumentError("socket_path is empty; the daemon's default is "
                                      "/run/tessera/agent.sock");
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  // The daemon is local: after a daemon restart, reconnect within a second, not gRPC's default
  // backoff of up to two minutes (snapshots fail, visibly, until then). The minimum is also the
  // time one connection attempt gets to finish its handshake: a busy daemon on a loaded host
  // needs more than 100 ms, so it stays at seconds (a daemon that is not running still fails at
  // once: the connection is refused).
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 5000);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  TESSERA_RETURN_IF_ERROR(cuda::ValidateStagingOptions(options.staging));
  auto channel = grpc::CreateCustomChannel("unix:" + options.socket_path,
                                           grpc::InsecureChannelCredentials(), args);
  std::unique_ptr<Client> client(new Client(options, channel));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  context.set_wait_for_ready(false);
  agent::ListVersionsRequest request;
  agent::ListVersionsResponse response;
  grpc::Status status = client->stub_->ListVersions(&context, request, &response);
  if (!status.ok()) {
    return absl::UnavailableError(absl::StrCat("no tesserad answers on ", options.socket_path,
                                               ": ", status.error_message(),
                                               " (is the daemon running, and is this the "
                                               "socket of its agent.socket_path?)"));
  }
  return client;
}

Client::Client(const Options& options, std::shared_ptr<grpc::Channel> channel)
    : options_(options),
      channel_(std::move(channel)),
      stub_(agent::Agent::NewStub(channel_)),
      engine_(options.use_gpu ? cuda::CopyEngine::Create(options.device, EngineOptions(options))
                              : cuda::CopyEngine::CreateHostOnly(EngineOptions(options))) {
  stats_.engine = engine_->Describe();
  Logger("agent")->info("copy engine: {}", stats_.engine);
  worker_ = std::thread([this] { WorkerLoop(); });
}

Client::~Client() {
  Close(false).IgnoreError();
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  worker_.join();
  UnmapSlots();
}

grpc::ClientContext* Client::NewContext(grpc::ClientContext* context) const {
  context->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::milliseconds(options_.rpc_timeout_ms));
  return context;
}

void Client::UnmapSlots() {
  for (auto& slot : slots_) {
    if (slot.pinned) engine_->UnregisterHost(slot.segment->header()).IgnoreError();
  }
  slots_.clear();
}

absl::Status Client::Register(const std::string& job_id, uint32_t rank, uint32_t world_size,
                              std::vector<Entry> entries) {
  Wait().IgnoreError();  // the worker reads the registration while a snapshot runs
  for (size_t i = 0; i < entries.size(); ++i) {
    const Entry& e = entries[i];
    if (e.data == nullptr && e.spec.nbytes() > 0) {
      return absl::InvalidArgumentError(absl::StrCat("entry ", i, " ('", e.spec.name(),
                                                     "') has no data pointer"));
    }
    if (e.spec.kind() == ENTRY_KIND_BLOB && e.length > e.spec.nbytes()) {
      return absl::InvalidArgumentError(absl::StrCat("blob '", e.spec.name(), "' length ",
                                                     e.length, " exceeds its capacity ",
                                                     e.spec.nbytes()));
    }
  }
  std::vector<EntrySpec> specs;
  for (const Entry& e : entries) specs.push_back(e.spec);
  std::optional<DpState> dp;
  if (!dp_config_.members.empty()) {
    const std::vector<uint32_t>& members = dp_config_.members;
    std::set<uint32_t> seen;
    int dp_rank = -1;
    for (size_t j = 0; j < members.size(); ++j) {
      if (members[j] >= world_size) {
        return absl::InvalidArgumentError(absl::StrCat(
            "data-parallel member ", members[j], " is not a rank of the job (world size ",
            world_size, ")"));
      }
      if (!seen.insert(members[j]).second) {
        return absl::InvalidArgumentError(
            absl::StrCat("data-parallel member ", members[j], " is listed twice"));
      }
      if (members[j] == rank) dp_rank = static_cast<int>(j);
    }
    if (dp_rank < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "rank ", rank, " is not in its data-parallel group [", absl::StrJoin(members, ","),
          "]: the group lists the job ranks that hold the same replicated tensors"));
    }
    auto slicing = DpSlicing::Create(specs, dp_config_.replicated,
                                     static_cast<uint32_t>(members.size()));
    if (!slicing.ok()) return slicing.status();
    for (size_t i = 0; i < specs.size(); ++i) {
      if (auto slice = slicing->slice(dp_rank, i)) *specs[i].mutable_slice() = *slice;
    }
    dp = DpState{members, static_cast<uint32_t>(dp_rank), MembersFingerprint(members),
                 std::make_shared<const DpSlicing>(std::move(*slicing))};
  }
  job_id_ = job_id;
  rank_ = rank;
  world_size_ = world_size;
  entries_ = std::move(entries);
  specs_ = std::move(specs);
  dp_ = std::move(dp);
  registered_ = false;
  TESSERA_RETURN_IF_ERROR(Attach());
  registered_ = true;
  return absl::OkStatus();
}

absl::Status Client::Attach() {
  agent::RegisterRequest request;
  request.set_job_id(job_id_);
  request.set_rank(rank_);
  request.set_world_size(world_size_);
  for (const EntrySpec& spec : specs_) *request.add_entries() = spec;
  agent::RegisterResponse response;
  grpc::ClientContext context;
  TESSERA_RETURN_IF_ERROR(
      FromGrpcStatus(stub_->Register(NewContext(&context), request, &response)));
  if (response.slot_paths_size() != 2 ||
      response.entry_offsets_size() != static_cast<int>(entries_.size())) {
    return absl::InternalError(absl::StrCat("daemon returned ", response.slot_paths_size(),
                                            " slots and ", response.entry_offsets_size(),
                                            " offsets for ", entries_.size(), " entries"));
  }
  UnmapSlots();
  for (const std::string& path : response.slot_paths()) {
    TESSERA_ASSIGN_OR_RETURN(auto segment, Segment::Open(path, /*writable=*/true,
                                                         /*prefault=*/true));
    if (segment->file_bytes() != response.segment_bytes()) {
      return absl::InternalError(absl::StrCat(path, " is ", segment->file_bytes(),
                                              " bytes, the daemon said ",
                                              response.segment_bytes()));
    }
    MappedSlot slot{std::move(segment), false};
    if (engine_->has_gpu()) {
      TESSERA_RETURN_IF_ERROR(engine_->RegisterHost(slot.segment->header(),
                                                    slot.segment->file_bytes()));
      slot.pinned = true;
    }
    slots_.push_back(std::move(slot));
  }
  layout_ = response;
  Logger("agent")->info("registered job '{}' rank {}/{}: {} entries{}, slots {} and {}{}", job_id_,
                        rank_, world_size_, entries_.size(),
                        dp_ ? absl::StrCat(", DP rank ", dp_->dp_rank, " of ", dp_->members.size(),
                                           " storing ", dp_->slicing->range(dp_->dp_rank).second -
                                                            dp_->slicing->range(dp_->dp_rank).first,
                                           " of ", dp_->slicing->replicated_bytes(),
                                           " replicated bytes")
                            : "",
                        response.slot_paths(0), response.slot_paths(1),
                        response.newest_sealed_step() >= 0
                            ? absl::StrCat(", newest sealed step ", response.newest_sealed_step())
                            : "");
  return absl::OkStatus();
}

absl::Status Client::UpdateEntry(size_t index, void* data, uint64_t length) {
  if (index >= entries_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("entry index ", index, " is not below ",
                                                   entries_.size()));
  }
  Entry& e = entries_[index];
  if (e.spec.kind() == ENTRY_KIND_TENSOR && length != e.spec.nbytes()) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", e.spec.name(), "' is ",
                                                   e.spec.nbytes(), " bytes; length ", length,
                                                   " must equal it"));
  }
  if (length > e.spec.nbytes()) {
    return absl::InvalidArgumentError(absl::StrCat("blob '", e.spec.name(), "' length ", length,
                                                   " exceeds its capacity ", e.spec.nbytes()));
  }
  if (data == nullptr && length > 0) {
    return absl::InvalidArgumentError("entry '" + e.spec.name() + "' data pointer is null");
  }
  if (data != nullptr) e.data = data;
  e.length = length;
  return absl::OkStatus();
}

absl::StatusOr<Client::SnapshotOutcome> Client::Snapshot(int64_t step, void* stream) {
  if (!registered_) return absl::FailedPreconditionError("Snapshot before Register");
  if (step < 0) return absl::InvalidArgumentError(absl::StrCat("step must be >= 0, got ", step));
  std::unique_lock<std::mutex> lock(mu_);
  if (busy_) {
    int64_t in_flight = pending_ ? pending_->step : -1;
    if (options_.when_busy == BusyPolicy::kSkip) {
      const uint64_t skipped = ++stats_.skipped;
      // Every skip is counted; the log says so at most every 10 s, with the count since.
      const int64_t now = NowNs();
      if (last_skip_log_ns_ != 0 && now - last_skip_log_ns_ < 10'000'000'000) {
        return SnapshotOutcome::kSkipped;
      }
      const uint64_t since = skipped - skips_logged_;
      last_skip_log_ns_ = now;
      skips_logged_ = skipped;
      lock.unlock();
      Logger("agent")->warn("snapshot of step {} skipped: the previous snapshot{} is still being "
                            "copied or sealed ({} skipped since the last such line, {} in all)",
                            step, in_flight >= 0 ? absl::StrCat(" (step ", in_flight, ")") : "",
                            since, skipped);
      return SnapshotOutcome::kSkipped;
    }
    const int64_t start = NowNs();
    cv_.wait(lock, [this] { return !busy_; });
    const int64_t waited = NowNs() - start;
    ++stats_.busy_waits;
    stats_.busy_wait_ns += waited;
    Logger("agent")->warn("snapshot of step {} waited {:.3f} ms for the previous snapshot", step,
                          waited / 1e6);
  }
  const int64_t called_ns = NowNs();
  TESSERA_ASSIGN_OR_RETURN(uint64_t ticket, engine_->MarkSnapshotPoint(stream));
  std::vector<Source> sources;
  sources.reserve(entries_.size());
  for (size_t i = 0; i < entries_.size(); ++i) {
    const Entry& e = entries_[i];
    if (specs_[i].has_slice()) {
      sources.push_back({static_cast<const char*>(e.data) + specs_[i].slice().offset(),
                         specs_[i].slice().length()});
    } else {
      sources.push_back({e.data, EntryLength(e)});
    }
  }
  pending_ = Job{step, ticket, std::move(sources), called_ns};
  busy_ = true;
  ++stats_.started;
  lock.unlock();
  cv_.notify_all();
  return SnapshotOutcome::kStarted;
}

absl::Status Client::Fence(void* stream) { return engine_->Fence(stream); }

absl::Status Client::SetStaging(const cuda::StagingOptions& staging) {
  TESSERA_RETURN_IF_ERROR(engine_->SetStaging(staging));
  Logger("agent")->info("staging: {}{}", std::string(cuda::StagingModeName(staging.mode)),
                        staging.budget_bytes > 0
                            ? absl::StrCat(", budget ", staging.budget_bytes, " bytes")
                            : absl::StrCat(", budget ", staging.budget_free_fraction,
                                           " of free device memory"));
  return absl::OkStatus();
}

absl::Status Client::Wait() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return !busy_; });
  return last_status_;
}

void Client::WorkerLoop() {
  while (true) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return stopping_ || pending_.has_value(); });
    if (!pending_) return;
    Job job = std::move(*pending_);
    pending_.reset();
    lock.unlock();
    uint64_t bytes = 0;
    Phases phases;
    absl::Status status = RunSnapshot(job, &bytes, &phases);
    lock.lock();
    busy_ = false;
    last_status_ = status;
    if (status.ok()) {
      // Counted together with the seal, so that stats() never shows one without the other.
      stats_.bytes_copied += bytes;
      ++stats_.sealed;
      stats_.last_sealed_step = job.step;
      stats_.last_begin_ns = phases.begin_ns;
      stats_.last_copy_ns = phases.copy_ns;
      stats_.last_seal_ns = phases.seal_ns;
    } else {
      if (!absl::IsUnavailable(status)) ++stats_.failed;  // kUnavailable was counted as skipped
      stats_.last_error = status.ToString();
    }
    lock.unlock();
    cv_.notify_all();
    if (!status.ok()) {
      if (absl::IsUnavailable(status)) {
        Logger("agent")->warn("{}", std::string(status.message()));
      } else {
        Logger("agent")->error("snapshot of step {} failed: {}", job.step, status.ToString());
      }
    }
  }
}

absl::Status Client::RunSnapshot(const Job& job, uint64_t* bytes_copied, Phases* phases) {
  agent::BeginSnapshotRequest begin;
  begin.set_job_id(job_id_);
  begin.set_rank(rank_);
  begin.set_step(job.step);
  begin.set_replace_uncommitted(options_.when_busy == BusyPolicy::kSkip);
  {
    std::lock_guard<std::mutex> lock(mu_);
    begin.set_skipped_snapshots(stats_.skipped);  // the daemon exports them as a metric
  }
  agent::BeginSnapshotResponse begun;
  absl::Status status;
  const int64_t start_ns = NowNs();
  auto begin_snapshot = [&] {
    for (int64_t backoff_ms = 2;; backoff_ms = std::min<int64_t>(backoff_ms * 2, 100)) {
      grpc::ClientContext begin_context;
      status = FromGrpcStatus(stub_->BeginSnapshot(NewContext(&begin_context), begin, &begun));
      // kUnavailable: the slot is still being protected, or the daemon is restarting. Skip, or
      // retry for up to rpc_timeout_ms under the wait policy.
      if (!absl::IsUnavailable(status) || options_.when_busy != BusyPolicy::kWait ||
          NowNs() - start_ns > options_.rpc_timeout_ms * 1000000) {
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(backoff_ms));
    }
  };
  begin_snapshot();
  if (options_.when_busy == BusyPolicy::kWait && NowNs() - start_ns > 1000000) {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.busy_waits;
    stats_.busy_wait_ns += NowNs() - start_ns;
  }
  if (absl::IsNotFound(status)) {
    // The daemon restarted (or was upgraded) and no longer knows this rank: register again. It
    // re-adopted the sealed slot, so the newest sealed step is kept.
    Logger("agent")->warn("daemon does not know job '{}' rank {} ({}); registering again",
                          job_id_, rank_, status.ToString());
    status = Attach();
    // A restarted daemon refuses new snapshots until it has learned the job's state: under the
    // wait policy that is waited for too, or the rank would skip a step every other rank waits for.
    if (status.ok()) begin_snapshot();
  }
  if (status.ok() && begun.slot_index() >= slots_.size()) {
    status = absl::InternalError(absl::StrCat("daemon chose slot ", begun.slot_index()));
  }
  if (!status.ok()) {
    engine_->IssueCopies(job.ticket, {}).IgnoreError();  // releases a waiting Fence
    if (absl::IsUnavailable(status)) {
      std::lock_guard<std::mutex> lock(mu_);
      ++stats_.skipped;
      return absl::UnavailableError(absl::StrCat("snapshot of step ", job.step,
                                                 " skipped: ", status.message()));
    }
    return Annotate(status, absl::StrCat("BeginSnapshot(step ", job.step, ")"));
  }
  Segment& slot = *slots_[begun.slot_index()].segment;
  std::vector<cuda::CopyOp> ops;
  ops.reserve(job.sources.size());
  ShardManifest manifest;
  manifest.set_layout_version(kSegmentLayoutVersion);
  manifest.set_job_id(job_id_);
  manifest.set_rank(rank_);
  manifest.set_world_size(world_size_);
  manifest.set_step(job.step);
  uint64_t bytes = 0;
  for (size_t i = 0; i < job.sources.size(); ++i) {
    const Source& source = job.sources[i];
    ops.push_back({slot.payload() + layout_.entry_offsets(i), source.data, source.length});
    bytes += source.length;
    ManifestEntry* m = manifest.add_entries();
    *m->mutable_spec() = specs_[i];
    m->set_offset(layout_.entry_offsets(i));
    m->set_length(source.length);
  }
  const size_t last = entries_.size() - 1;
  manifest.set_data_bytes(layout_.entry_offsets(last) + StoredBytes(specs_[last]));
  if (dp_) {
    DataParallelGroup* group = manifest.mutable_data_parallel();
    group->set_dp_rank(dp_->dp_rank);
    group->set_dp_size(static_cast<uint32_t>(dp_->members.size()));
    group->set_replicated_bytes(dp_->slicing->replicated_bytes());
    group->set_members_fingerprint(dp_->fingerprint);
  }
  // Checksummed as the bytes land, so that the seal need not read them again.
  const int64_t issue_ns = NowNs();
  phases->begin_ns = issue_ns - job.called_ns;
  TESSERA_RETURN_IF_ERROR(engine_->IssueChecksummedCopies(job.ticket, ops));
  TESSERA_ASSIGN_OR_RETURN(std::vector<cuda::OpChecksum> sums,
                           engine_->WaitChecksums(job.ticket));
  const int64_t checksummed_ns = NowNs();
  phases->copy_ns = checksummed_ns - issue_ns;
  manifest.set_crc_block_bytes(cuda::CopyEngineOptions().checksum_block_bytes);
  for (size_t i = 0; i < sums.size(); ++i) {
    ManifestEntry* m = manifest.mutable_entries(static_cast<int>(i));
    m->set_crc32c(sums[i].crc);
    m->mutable_block_crc32c()->Add(sums[i].blocks.begin(), sums[i].blocks.end());
  }
  const size_t manifest_bytes = manifest.ByteSizeLong();
  if (manifest_bytes > layout_.manifest_capacity()) {
    return absl::InternalError(absl::StrCat("manifest of ", manifest_bytes,
                                            " bytes exceeds its reserved ",
                                            layout_.manifest_capacity()));
  }
  manifest.SerializeToArray(slot.payload() + layout_.manifest_offset(),
                            static_cast<int>(manifest_bytes));
  // The payload's CRC32C: the entries' checksums, with the bytes between them and the manifest
  // read here (a few pages, unless a blob is far below its capacity).
  uint32_t payload_crc = 0;
  uint64_t at = 0;
  for (size_t i = 0; i < ops.size(); ++i) {
    const uint64_t offset = layout_.entry_offsets(static_cast<int>(i));
    if (offset < at) {
      return absl::InternalError(absl::StrCat("the daemon's layout puts entry ", i, " at ", offset,
                                              ", before the end of the one before (", at, ")"));
    }
    payload_crc = Crc32c(slot.payload() + at, offset - at, payload_crc);
    payload_crc = Crc32cCombine(payload_crc, sums[i].crc, ops[i].bytes);
    at = offset + ops[i].bytes;
  }
  payload_crc = Crc32c(slot.payload() + at, layout_.manifest_offset() + manifest_bytes - at,
                       payload_crc);
  if (options_.after_checksums_for_testing) {
    options_.after_checksums_for_testing(slot.payload(),
                                         layout_.manifest_offset() + manifest_bytes);
  }
  agent::SealSnapshotRequest seal;
  seal.set_job_id(job_id_);
  seal.set_rank(rank_);
  seal.set_step(job.step);
  seal.set_manifest_bytes(manifest_bytes);
  seal.set_payload_crc32c(payload_crc);
  agent::SealSnapshotResponse sealed;
  grpc::ClientContext seal_context;
  TESSERA_RETURN_IF_ERROR(Annotate(
      FromGrpcStatus(stub_->SealSnapshot(NewContext(&seal_context), seal, &sealed)),
      absl::StrCat("SealSnapshot(step ", job.step, ")")));
  phases->seal_ns = NowNs() - checksummed_ns;
  *bytes_copied = bytes;
  return absl::OkStatus();
}

uint64_t Client::StoredOffset(size_t i) const {
  return specs_[i].has_slice() ? specs_[i].slice().offset() : 0;
}

absl::Status Client::CheckRestorable(const ShardManifest& manifest, uint64_t payload_bytes,
                                     uint32_t rank, int dp_rank) const {
  std::vector<std::string> problems;
  if (manifest.job_id() != job_id_ || manifest.rank() != rank) {
    problems.push_back(absl::StrCat("the snapshot is of job '", manifest.job_id(), "' rank ",
                                    manifest.rank(), ", not rank ", rank));
  }
  const DataParallelGroup& group = manifest.data_parallel();
  if (dp_) {
    const uint32_t want_rank = dp_rank >= 0 ? static_cast<uint32_t>(dp_rank) : dp_->dp_rank;
    if (!manifest.has_data_parallel()) {
      problems.push_back("the snapshot is not DP-sharded, but a data-parallel group is set");
    } else if (group.dp_size() != dp_->members.size() ||
               group.members_fingerprint() != dp_->fingerprint || group.dp_rank() != want_rank) {
      problems.push_back(absl::StrCat(
          "the snapshot is DP rank ", group.dp_rank(), " of a group of ", group.dp_size(),
          " (members fingerprint ", absl::Hex(group.members_fingerprint()), "), not DP rank ",
          want_rank, " of [", absl::StrJoin(dp_->members, ","), "]"));
    }
  } else if (manifest.has_data_parallel()) {
    problems.push_back(absl::StrCat("the snapshot is DP-sharded (DP rank ", group.dp_rank(),
                                    " of ", group.dp_size(), "): set the same data-parallel "
                                    "group before Register"));
  }
  std::map<std::string, const ManifestEntry*> by_name;
  for (const ManifestEntry& m : manifest.entries()) by_name[m.spec().name()] = &m;
  // Another member's shard is read only for its slices of the replicated tensors: its own
  // entries are its business.
  const bool other_member = dp_ && dp_rank >= 0;
  for (size_t i = 0; i < entries_.size(); ++i) {
    EntrySpec want = specs_[i];
    if (other_member) {
      if (!dp_->slicing->replicated(i)) continue;
      *want.mutable_slice() = *dp_->slicing->slice(dp_rank, i);
    }
    auto it = by_name.find(want.name());
    if (it == by_name.end()) {
      problems.push_back(absl::StrCat("'", want.name(), "' is registered but not in the "
                                      "snapshot"));
      continue;
    }
    const ManifestEntry& m = *it->second;
    by_name.erase(it);
    if (m.spec().SerializeAsString() != want.SerializeAsString()) {
      auto slice_of = [](const EntrySpec& s) {
        return s.has_slice() ? absl::StrCat(" stored as bytes [", s.slice().offset(), ", +",
                                            s.slice().length(), ")")
                             : std::string();
      };
      problems.push_back(absl::StrCat("'", want.name(), "' is ", Describe(want), slice_of(want),
                                      " now but ", Describe(m.spec()), slice_of(m.spec()),
                                      " in the snapshot"));
    } else if (m.length() > StoredBytes(m.spec()) ||
               !RangeWithin(m.offset(), m.length(), payload_bytes)) {
      problems.push_back(absl::StrCat("'", want.name(), "' lies outside the payload"));
    }
  }
  for (const auto& [name, m] : by_name) {
    if (other_member) break;
    problems.push_back(absl::StrCat("'", name, "' is in the snapshot but not registered"));
  }
  if (problems.empty()) return absl::OkStatus();
  const size_t shown = std::min<size_t>(problems.size(), 8);
  std::vector<std::string> head(problems.begin(), problems.begin() + shown);
  return absl::FailedPreconditionError(absl::StrCat(
      "step ", manifest.step(), " of rank ", rank,
      " does not match the registered state, so nothing was restored: ",
      absl::StrJoin(head, "; "),
      problems.size() > shown ? absl::StrCat("; and ", problems.size() - shown, " more") : ""));
}

// A prepared restore segment: mapped read-only (or one of this client's own slots), pinned on a
// GPU while it is read, with its parsed manifest.
class Client::RestoreSource {
 public:
  RestoreSource(cuda::CopyEngine* engine) : engine_(engine) {}
  ~RestoreSource() {
    if (pinned_) {
      engine_->UnregisterHost(const_cast<SegmentHeader*>(segment_->header())).IgnoreError();
    }
  }
  const uint8_t* payload() const { return segment_->payload(); }

  cuda::CopyEngine* engine_;
  const Segment* segment_ = nullptr;
  std::unique_ptr<Segment> opened_;
  bool pinned_ = false;
  std::string job_id_;
  agent::PrepareRestoreResponse response_;
  // The manifest's bytes, copied out of the segment before they were parsed, so that the
  // checksum over them (VerifyLayout) is of the bytes parsed even if the segment changes.
  std::string manifest_bytes_;
  ShardManifest manifest_;
  std::map<std::string, const ManifestEntry*> by_name_;
};

absl::StatusOr<std::unique_ptr<Client::RestoreSource>> Client::OpenRestore(
    const std::string& job_id, uint32_t rank, int64_t step, bool client_verifies,
    bool for_reader) {
  agent::PrepareRestoreRequest request;
  request.set_job_id(job_id);
  request.set_rank(rank);
  request.set_step(step);
  request.set_client_verifies(client_verifies);
  auto source = std::make_unique<RestoreSource>(engine_.get());
  source->job_id_ = job_id;
  agent::PrepareRestoreResponse& response = source->response_;
  // A daemon that cannot reach the members holding the shard yet answers UNAVAILABLE.
  TESSERA_RETURN_IF_ERROR(WhileUnavailable(options_.restore_resolve_timeout_ms, [&] {
    grpc::ClientContext context;
    return FromGrpcStatus(stub_->PrepareRestore(NewContext(&context), request, &response));
  }));
  const std::string what = absl::StrCat("job '", job_id, "' rank ", rank, " step ",
                                        response.step());
  // Read from our own (pinned) mapping when the step sits in one of our slots. A reader leaves
  // slots_ alone: it may run beside the worker, which re-registers after a daemon restart.
  for (size_t i = 0; !for_reader && i < slots_.size(); ++i) {
    if (slots_[i].segment->path() == response.segment_path()) {
      source->segment_ = slots_[i].segment.get();
    }
  }
  if (source->segment_ == nullptr) {
    TESSERA_ASSIGN_OR_RETURN(source->opened_,
                             Segment::Open(response.segment_path(), /*writable=*/false));
    source->segment_ = source->opened_.get();
    if (engine_->has_gpu() && !for_reader) {
      source->pinned_ = engine_->RegisterHost(
          const_cast<SegmentHeader*>(source->segment_->header()),
          source->segment_->file_bytes()).ok();
    }
  }
  // The bounds come from the slot's header, which a trainer can write: checked without overflow.
  if (response.payload_bytes() > source->segment_->capacity_bytes() ||
      !RangeWithin(response.manifest_offset(), response.manifest_bytes(),
                   response.payload_bytes()) ||
      response.manifest_bytes() > static_cast<uint64_t>(std::numeric_limits<int>::max())) {
    return absl::DataLossError(absl::StrCat(what, ": the daemon's payload bounds do not fit ",
                                            response.segment_path()));
  }
  source->manifest_bytes_.assign(
      reinterpret_cast<const char*>(source->payload() + response.manifest_offset()),
      response.manifest_bytes());
  if (!source->manifest_.ParseFromString(source->manifest_bytes_)) {
    return absl::DataLossError(absl::StrCat("the manifest of ", what, " in ",
                                            response.segment_path(), " does not parse"));
  }
  for (const ManifestEntry& m : source->manifest_.entries()) {
    source->by_name_[m.spec().name()] = &m;
  }
  return source;
}

absl::Status Client::VerifyLayout(const RestoreSource& source) const {
  const ShardManifest& manifest = source.manifest_;
  const agent::PrepareRestoreResponse& r = source.response_;
  const std::string what = absl::StrCat("job '", source.job_id_, "' rank ", manifest.rank(),
                                        " step ", r.step());
  const uint64_t block = manifest.crc_block_bytes();
  if (block == 0) {
    return absl::UnimplementedError(what + ": the snapshot has no block checksums");
  }
  if (block < kMinCrcBlockBytes || block > kMaxCrcBlockBytes) {
    return absl::DataLossError(absl::StrCat(what, ": crc_block_bytes ", block, " is not ",
                                            kMinCrcBlockBytes, " to ", kMaxCrcBlockBytes));
  }
  std::vector<const ManifestEntry*> entries;
  for (const ManifestEntry& m : manifest.entries()) entries.push_back(&m);
  std::sort(entries.begin(), entries.end(), [](const ManifestEntry* a, const ManifestEntry* b) {
    return a->offset() < b->offset();
  });
  const uint8_t* payload = source.payload();
  uint32_t crc = 0;
  uint64_t at = 0;
  for (const ManifestEntry* m : entries) {
    if (m->offset() < at || !RangeWithin(m->offset(), m->length(), r.manifest_offset())) {
      return absl::DataLossError(absl::StrCat(what, ": entry '", m->spec().name(), "' at [",
                                              m->offset(), ", +", m->length(),
                                              ") overlaps another or the manifest"));
    }
    const uint64_t blocks = (m->length() + block - 1) / block;
    if (static_cast<uint64_t>(m->block_crc32c_size()) != blocks) {
      return absl::DataLossError(absl::StrCat(what, ": entry '", m->spec().name(), "' has ",
                                              m->block_crc32c_size(), " block checksums, not ",
                                              blocks));
    }
    uint32_t whole = 0;
    for (uint64_t b = 0; b < blocks; ++b) {
      whole = Crc32cCombine(whole, m->block_crc32c(static_cast<int>(b)),
                            std::min(block, m->length() - b * block));
    }
    if (whole != m->crc32c()) {
      return absl::DataLossError(absl::StrCat(what, ": entry '", m->spec().name(),
                                              "''s block checksums do not make its CRC32C"));
    }
    crc = Crc32c(payload + at, m->offset() - at, crc);
    crc = Crc32cCombine(crc, m->crc32c(), m->length());
    at = m->offset() + m->length();
  }
  crc = Crc32c(payload + at, r.manifest_offset() - at, crc);
  crc = Crc32c(source.manifest_bytes_.data(), source.manifest_bytes_.size(), crc);
  if (crc != r.payload_crc32c()) {
    return absl::DataLossError(absl::StrCat(
        what, ": the payload's CRC32C from its manifest and the bytes around its entries is 0x",
        absl::Hex(crc), ", not the sealed 0x", absl::Hex(r.payload_crc32c())));
  }
  return absl::OkStatus();
}

absl::Status Client::CopyVerified(const RestoreSource& source,
                                  const std::vector<cuda::CopyOp>& ops) {
  TESSERA_RETURN_IF_ERROR(VerifyLayout(source));
  const uint64_t block = source.manifest_.crc_block_bytes();
  // Entries restored into GPU memory are verified there, by the copy engine's CRC32C kernel
  // over what landed, beside the copies; the others by the verifier's threads ahead of their
  // copies, in the order the copies ask: device destinations first, then host ones.
  const bool on_gpu = engine_->has_gpu() && options_.checksum_on_device;
  std::vector<std::vector<uint32_t>> gpu_blocks(on_gpu ? ops.size() : 0);
  std::vector<BlockVerifier::Block> device_blocks;
  std::vector<BlockVerifier::Block> host_blocks;
  for (size_t i = 0; i < ops.size(); ++i) {
    const ManifestEntry& m = *source.by_name_.at(entries_[i].spec.name());
    absl::StatusOr<cuda::MemoryKind> kind = engine_->Locate(ops[i].dst);
    const bool device = kind.ok() && *kind == cuda::MemoryKind::kDevice;
    if (device && on_gpu) {
      gpu_blocks[i].assign(m.block_crc32c().begin(), m.block_crc32c().end());
      continue;
    }
    auto& into = device ? device_blocks : host_blocks;
    for (int b = 0; b < m.block_crc32c_size(); ++b) {
      const uint64_t offset = b * block;
      into.push_back({i, offset, static_cast<const uint8_t*>(ops[i].src) + offset,
                      std::min(block, m.length() - offset), m.block_crc32c(b)});
    }
  }
  device_blocks.insert(device_blocks.end(), host_blocks.begin(), host_blocks.end());
  const std::string what =
      absl::StrCat("job '", job_id_, "' rank ", rank_, " step ", source.response_.step());
  BlockVerifier verifier(std::move(device_blocks), options_.checksum_threads, what);
  auto before = [&](size_t op, uint64_t offset, uint64_t bytes) {
    return verifier.WaitFor(op, offset, bytes);
  };
  if (gpu_blocks.empty()) return engine_->CopySyncChecked(ops, before);
  return Annotate(engine_->CopySyncVerified(ops, before, gpu_blocks, block), what);
}

absl::StatusOr<Client::DpAgreement> Client::AgreeOnRestore(int64_t step) {
  DpAgreement agreement;
  // NCCL for the replicated tensors in GPU memory when NCCL loads here and on every member, and
  // every member has the same tensors on the GPU; the rest goes through the daemon.
  agreement.on_device.assign(entries_.size(), false);
  std::string mask;
  bool any_device = false;
  for (size_t i = 0; engine_->has_gpu() && i < entries_.size(); ++i) {
    if (!dp_->slicing->replicated(i) || entries_[i].spec.nbytes() == 0) continue;
    auto kind = engine_->Locate(entries_[i].data);
    agreement.on_device[i] = kind.ok() && *kind == cuda::MemoryKind::kDevice;
    any_device = any_device || agreement.on_device[i];
  }
  for (bool d : agreement.on_device) mask.push_back(d ? '1' : '0');
  bool nccl = options_.nccl && any_device;
  std::string note = !options_.nccl ? "NCCL is turned off (Options.nccl)"
                     : !any_device  ? "no replicated tensor is GPU memory"
                                    : "";
  if (nccl) {
    if (absl::Status available = cuda::NcclAvailable(); !available.ok()) {
      nccl = false;
      note = std::string(available.message());
    }
  }
  rendezvous::DpRestoreOffer offer;
  offer.set_step(step);
  offer.set_nccl(nccl);
  offer.set_note(note);
  offer.set_device_mask_fingerprint(StableFingerprint(mask));
  if (nccl && dp_->dp_rank == 0) {
    absl::StatusOr<std::string> id = cuda::NcclUniqueId();
    if (id.ok()) {
      offer.set_nccl_id(*id);
    } else {
      offer.set_nccl(false);
      offer.set_note(std::string(id.status().message()));
    }
  }
  rendezvous::JoinRequest join;
  join.set_job_id(job_id_);
  join.set_group(absl::StrCat("dp.", absl::Hex(dp_->fingerprint, absl::kZeroPad16), ".",
                              dp_->members.size()));
  join.set_index(dp_->dp_rank);
  join.set_size(static_cast<uint32_t>(dp_->members.size()));
  join.set_payload(offer.SerializeAsString());
  join.set_nonce(absl::StrCat(absl::Hex(std::random_device{}()), absl::Hex(NowNs())));
  const int64_t start = NowNs();
  const int64_t limit_ns = options_.dp_restore_timeout_ms * 1000000;
  int64_t last_log = start;
  rendezvous::JoinResponse joined;
  while (true) {
    const int64_t left_ms = (limit_ns - (NowNs() - start)) / 1000000;
    join.set_wait_ms(static_cast<uint32_t>(std::clamp<int64_t>(left_ms, 1, 10000)));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(join.wait_ms() + 10000));
    absl::Status status = FromGrpcStatus(stub_->Rendezvous(&context, join, &joined));
    if (status.ok()) break;
    const bool retry = absl::IsDeadlineExceeded(status) || absl::IsUnavailable(status);
    if (!retry || NowNs() - start >= limit_ns) {
      return Annotate(status, absl::StrCat("restore of step ", step, ": DP rank ",
                                           dp_->dp_rank, " waited ", (NowNs() - start) / 1000000,
                                           " ms in all for the other members of [",
                                           absl::StrJoin(dp_->members, ","), "]"));
    }
    if (NowNs() - last_log > 10'000'000'000) {
      last_log = NowNs();
      Logger("agent")->warn("restore of job '{}' waits {:.0f} s for its data-parallel group: {}",
                            job_id_, (NowNs() - start) / 1e9, std::string(status.message()));
    }
  }
  std::vector<std::string> steps;
  bool all_nccl = true;
  agreement.step = step;
  for (int j = 0; j < joined.payloads_size(); ++j) {
    rendezvous::DpRestoreOffer other;
    if (!other.ParseFromString(joined.payloads(j))) {
      return absl::InternalError(absl::StrCat("DP rank ", j, "'s rendezvous offer does not parse"));
    }
    steps.push_back(absl::StrCat(dp_->members[j], ":", other.step()));
    if (other.step() != step) agreement.step = -1;
    if (!other.nccl()) {
      all_nccl = false;
      if (agreement.note.empty()) {
        agreement.note = absl::StrCat("rank ", dp_->members[j], ": ", other.note());
      }
    }
    if (j == 0) agreement.nccl_id = other.nccl_id();
    if (other.device_mask_fingerprint() != offer.device_mask_fingerprint() && all_nccl) {
      all_nccl = false;
      agreement.note = absl::StrCat("rank ", dp_->members[j], " holds other replicated tensors "
                                    "in GPU memory than rank ", rank_);
    }
  }
  if (agreement.step < 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the members of the data-parallel group would restore different steps (rank:step ",
        absl::StrJoin(steps, " "), "); a DP-sharded step needs every member's slice, so nothing "
        "was restored"));
  }
  agreement.nccl = all_nccl && !agreement.nccl_id.empty();
  if (!agreement.nccl) agreement.on_device.assign(entries_.size(), false);
  return agreement;
}

absl::StatusOr<uint64_t> Client::GatherFromDaemon(int64_t step, const std::vector<bool>* skip) {
  std::vector<std::unique_ptr<RestoreSource>> sources;
  std::vector<cuda::CopyOp> ops;
  uint64_t bytes = 0;
  for (uint32_t j = 0; j < dp_->members.size(); ++j) {
    if (j == dp_->dp_rank) continue;
    std::vector<DpPiece> pieces;
    for (const DpPiece& p : dp_->slicing->pieces(j)) {
      if (skip == nullptr || !(*skip)[p.entry]) pieces.push_back(p);
    }
    if (pieces.empty()) continue;
    const uint32_t rank = dp_->members[j];
    TESSERA_ASSIGN_OR_RETURN(auto source, OpenRestore(job_id_, rank, step));
    if (source->response_.step() != step) {
      return absl::FailedPreconditionError(absl::StrCat("rank ", rank, " prepared step ",
                                                        source->response_.step(), ", not ", step));
    }
    TESSERA_RETURN_IF_ERROR(CheckRestorable(source->manifest_, source->response_.payload_bytes(),
                                            rank, static_cast<int>(j)));
    for (const DpPiece& p : pieces) {
      const ManifestEntry& m = *source->by_name_[entries_[p.entry].spec.name()];
      ops.push_back({static_cast<char*>(entries_[p.entry].data) + p.offset,
                     source->payload() + m.offset(), p.length});
      bytes += p.length;
    }
    sources.push_back(std::move(source));
  }
  TESSERA_RETURN_IF_ERROR(Annotate(engine_->CopySync(ops),
                                   absl::StrCat("copying the DP group's slices of step ", step)));
  return bytes;
}

absl::StatusOr<uint64_t> Client::GatherWithNccl(const DpAgreement& agreement) {
  std::vector<cuda::BroadcastOp> ops;
  uint64_t bytes = 0;
  for (uint32_t j = 0; j < dp_->members.size(); ++j) {
    for (const DpPiece& p : dp_->slicing->pieces(j)) {
      if (!agreement.on_device[p.entry]) continue;
      ops.push_back({static_cast<char*>(entries_[p.entry].data) + p.offset, p.length,
                     static_cast<int>(j)});
      if (j != dp_->dp_rank) bytes += p.length;
    }
  }
  const int device = options_.device;  // -1: the current one
  uint64_t broadcast_bytes = 0;
  for (const cuda::BroadcastOp& op : ops) broadcast_bytes += op.bytes;
  TESSERA_RETURN_IF_ERROR(cuda::NcclBroadcast(
      agreement.nccl_id, static_cast<int>(dp_->dp_rank), static_cast<int>(dp_->members.size()),
      device, ops, NcclGatherTimeout(broadcast_bytes, options_.dp_restore_timeout_ms)));
  return bytes;
}

absl::Duration Client::NcclGatherTimeout(uint64_t bytes, int64_t dp_restore_timeout_ms) {
  const absl::Duration restore = absl::Milliseconds(std::max<int64_t>(dp_restore_timeout_ms, 1000));
  const absl::Duration needed = absl::Seconds(30) + absl::Nanoseconds(static_cast<double>(bytes));
  return std::min(restore, needed);
}

absl::StatusOr<int64_t> Client::Restore(int64_t step) {
  if (!registered_) return absl::FailedPreconditionError("Restore before Register");
  Wait().IgnoreError();
  const auto started = std::chrono::steady_clock::now();
  if (step < 0) {
    // The newest step every rank of the job can restore, so that all ranks resume together.
    agent::FindLatestRestorableRequest find;
    find.set_job_id(job_id_);
    find.set_resume(true);
    find.set_rank(rank_);
    find.set_world_size(world_size_);
    agent::FindLatestRestorableResponse found;
    // A cluster answers only from a complete view of the job's nodes, and from a majority.
    TESSERA_RETURN_IF_ERROR(WhileUnavailable(options_.restore_resolve_timeout_ms, [&] {
      grpc::ClientContext find_context;
      return FromGrpcStatus(stub_->FindLatestRestorable(NewContext(&find_context), find, &found));
    }));
    step = found.step();
  }
  const bool sharded = dp_ && dp_->members.size() > 1;
  DpAgreement agreement;
  if (sharded) {
    TESSERA_ASSIGN_OR_RETURN(agreement, AgreeOnRestore(step));
  }
  // The daemon hands over its local payload without reading it first; this client checks each
  // block just before copying it, beside the copies. On a mismatch, or a snapshot without block
  // checksums, it asks again for a payload the daemon checked (which restores a damaged one
  // from the other nodes, or says DATA_LOSS).
  TESSERA_ASSIGN_OR_RETURN(auto source,
                           OpenRestore(job_id_, rank_, step, /*client_verifies=*/true));
  TESSERA_RETURN_IF_ERROR(CheckRestorable(source->manifest_, source->response_.payload_bytes(),
                                          rank_, -1));
  auto ops_from = [&](const RestoreSource& from) {
    std::vector<cuda::CopyOp> ops;
    for (size_t i = 0; i < entries_.size(); ++i) {
      const ManifestEntry& m = *from.by_name_.at(entries_[i].spec.name());
      ops.push_back({static_cast<char*>(entries_[i].data) + StoredOffset(i),
                     from.payload() + m.offset(), m.length()});
    }
    return ops;
  };
  const auto opened = std::chrono::steady_clock::now();
  absl::Status copied = source->response_.verified()
                            ? engine_->CopySync(ops_from(*source))
                            : CopyVerified(*source, ops_from(*source));
  if (absl::IsDataLoss(copied) || absl::IsUnimplemented(copied)) {
    if (absl::IsDataLoss(copied)) {
      Logger("agent")->error("restore of job '{}' rank {} step {}: {}; asking the daemon to check "
                             "the snapshot and restore it from elsewhere",
                             job_id_, rank_, source->response_.step(), copied.ToString());
    }
    const int64_t asked = source->response_.step();
    source.reset();
    TESSERA_ASSIGN_OR_RETURN(source,
                             OpenRestore(job_id_, rank_, asked, /*client_verifies=*/false));
    TESSERA_RETURN_IF_ERROR(CheckRestorable(source->manifest_, source->response_.payload_bytes(),
                                            rank_, -1));
    copied = engine_->CopySync(ops_from(*source));
  }
  const int64_t restored = source->response_.step();
  TESSERA_RETURN_IF_ERROR(Annotate(copied, absl::StrCat("restoring step ", restored)));
  {
    const auto copied_at = std::chrono::steady_clock::now();
    std::lock_guard<std::mutex> lock(mu_);
    stats_.last_restore_open_ns =
        std::chrono::duration_cast<std::chrono::nanoseconds>(opened - started).count();
    stats_.last_restore_copy_ns =
        std::chrono::duration_cast<std::chrono::nanoseconds>(copied_at - opened).count();
  }
  for (size_t i = 0; i < entries_.size(); ++i) {
    if (!specs_[i].has_slice())
      entries_[i].length = source->by_name_[entries_[i].spec.name()]->length();
  }
  const uint64_t payload_bytes = source->response_.payload_bytes();
  source.reset();
  if (sharded) {
    uint64_t over_nccl = 0;
    bool nccl_ok = false;
    std::string note = agreement.note;
    if (agreement.nccl) {
      absl::StatusOr<uint64_t> broadcast = GatherWithNccl(agreement);
      nccl_ok = broadcast.ok();
      if (nccl_ok) {
        over_nccl = *broadcast;
      } else {
        note = absl::StrCat("NCCL failed: ", broadcast.status().message());
        Logger("agent")->warn("restore of step {}: gathering the DP group's slices over NCCL "
                              "failed ({}); reading them through the daemon instead",
                              restored, broadcast.status().ToString());
      }
    }
    // The rest (or everything, when NCCL was not used or failed) through the daemon.
    TESSERA_ASSIGN_OR_RETURN(uint64_t from_daemon,
                             GatherFromDaemon(restored, nccl_ok ? &agreement.on_device : nullptr));
    std::lock_guard<std::mutex> lock(mu_);
    stats_.dp_size = static_cast<uint32_t>(dp_->members.size());
    stats_.bytes_gathered = over_nccl + from_daemon;
    stats_.gathered_with_nccl = nccl_ok;
    stats_.gather_note = nccl_ok ? "" : note;
    Logger("agent")->info(
        "restore of step {}: DP rank {} of {} gathered {} bytes of the other members' slices: {} "
        "over NCCL, {} through the daemon{}",
        restored, dp_->dp_rank, dp_->members.size(), stats_.bytes_gathered, over_nccl,
        from_daemon, nccl_ok ? "" : absl::StrCat(" (", note, ")"));
  }
  Logger("agent")->info("restored job '{}' rank {} step {} ({} payload bytes)", job_id_, rank_,
                        restored, payload_bytes);
  return restored;
}

absl::Status Client::SetDataParallel(DataParallel dp) {
  Wait().IgnoreError();
  if (!dp.members.empty() && dp.members.size() > 65536) {
    return absl::InvalidArgumentError(absl::StrCat("a data-parallel group of ", dp.members.size(),
                                                   " members; at most 65536"));
  }
  dp_config_ = std::move(dp);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<agent::Version>> Client::ListVersions(const std::string& job_id) {
  agent::ListVersionsRequest request;
  request.set_job_id(job_id.empty() ? job_id_ : job_id);
  agent::ListVersionsResponse response;
  grpc::ClientContext context;
  TESSERA_RETURN_IF_ERROR(
      FromGrpcStatus(stub_->ListVersions(NewContext(&context), request, &response)));
  return std::vector<agent::Version>(response.versions().begin(), response.versions().end());
}

absl::StatusOr<std::shared_ptr<const Client::RestoreSource>> Client::OpenForReading(
    const std::string& job_id, uint32_t rank, int64_t step, bool daemon_verifies,
    bool use_cache) {
  if (use_cache && !daemon_verifies) {
    std::lock_guard<std::mutex> lock(read_mu_);
    for (const ReadSource& cached : read_sources_) {
      if (cached.job_id == job_id && cached.rank == rank && cached.step == step) {
        return cached.source;
      }
    }
  }
  TESSERA_ASSIGN_OR_RETURN(std::shared_ptr<const RestoreSource> source,
                           OpenRestore(job_id, rank, step, /*client_verifies=*/!daemon_verifies,
                                       /*for_reader=*/true));
  const int64_t answered = source->response_.step();
  if (step >= 0 && answered != step) {
    return absl::InternalError(absl::StrCat("asked for step ", step, " of job '", job_id,
                                            "' rank ", rank, ", the daemon answered step ",
                                            answered));
  }
  TESSERA_RETURN_IF_ERROR(VerifyLayout(*source));
  TESSERA_RETURN_IF_ERROR(
      Annotate(CheckReadableManifest(source->manifest_, job_id, rank, answered),
               absl::StrCat("job '", job_id, "' rank ", rank, " step ", answered)));
  // A manifest alone is asked for once (a trainer's restore asks for its own): its mapping is
  // not kept, or it would hold a slot the daemon may delete after a new registration.
  if (!use_cache) return source;
  std::lock_guard<std::mutex> lock(read_mu_);
  // A few sources: each keeps its segment mapped (and a segment the daemon deleted meanwhile,
  // its memory) until it is dropped.
  constexpr size_t kMaxReadSources = 8;
  auto same = [&](const ReadSource& cached) {
    return cached.job_id == job_id && cached.rank == rank && cached.step == answered;
  };
  read_sources_.erase(std::remove_if(read_sources_.begin(), read_sources_.end(), same),
                      read_sources_.end());
  if (read_sources_.size() >= kMaxReadSources) read_sources_.erase(read_sources_.begin());
  read_sources_.push_back({job_id, rank, answered, source});
  return source;
}

void Client::ForgetReadSources(const std::string& job_id, uint32_t rank) {
  std::lock_guard<std::mutex> lock(read_mu_);
  read_sources_.erase(std::remove_if(read_sources_.begin(), read_sources_.end(),
                                     [&](const ReadSource& cached) {
                                       return cached.job_id == job_id && cached.rank == rank;
                                     }),
                      read_sources_.end());
}

absl::Status Client::ReadVerified(const std::string& job_id, uint32_t rank, int64_t step,
                                  bool use_cache,
                                  const std::function<absl::Status(const RestoreSource&)>& read) {
  absl::Status first;  // of the read from a source this client checked, when it failed
  for (const bool daemon_verifies : {false, true}) {
    absl::StatusOr<std::shared_ptr<const RestoreSource>> source =
        OpenForReading(job_id, rank, step, daemon_verifies, use_cache);
    absl::Status status = source.ok() ? read(**source) : source.status();
    if (status.ok()) return status;
    const bool callers = absl::IsInvalidArgument(status) || absl::IsNotFound(status);
    if (!callers) ForgetReadSources(job_id, rank);
    if (daemon_verifies) {
      return absl::Status(status.code(),
                          absl::StrCat(first.message(), "; then, with the daemon checking the "
                                       "snapshot first: ", status.message()));
    }
    if (callers || !absl::IsDataLoss(status)) return status;
    // The slot may have been rewritten by its trainer since the daemon answered, or damaged.
    Logger("agent")->warn("reading job '{}' rank {} step {}: {}; asking the daemon to check the "
                          "snapshot", job_id, rank, step, status.ToString());
    first = status;
  }
  return first;
}

absl::StatusOr<ShardManifest> Client::ReadManifest(const std::string& job_id, uint32_t rank,
                                                   int64_t step) {
  if (step < -1) {
    return absl::InvalidArgumentError(absl::StrCat("step must be >= 0, or -1 for the newest; "
                                                   "got ", step));
  }
  ShardManifest manifest;
  TESSERA_RETURN_IF_ERROR(ReadVerified(job_id, rank, step, /*use_cache=*/false,
                                       [&](const RestoreSource& source) {
                                         manifest = source.manifest_;
                                         return absl::OkStatus();
                                       }));
  return manifest;
}

absl::Status Client::ReadRange(const std::string& job_id, uint32_t rank, int64_t step,
                               const std::string& entry, uint64_t offset, uint64_t length,
                               void* dst) {
  if (step < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "step must be >= 0 to read a range, got ", step, " (ReadManifest(-1) says the newest)"));
  }
  if (dst == nullptr && length > 0) {
    return absl::InvalidArgumentError(absl::StrCat("dst is null for ", length, " bytes"));
  }
  return ReadVerified(job_id, rank, step, /*use_cache=*/true, [&](const RestoreSource& source) {
    const std::string what =
        absl::StrCat("job '", job_id, "' rank ", rank, " step ", step, " entry '", entry, "'");
    auto it = source.by_name_.find(entry);
    if (it == source.by_name_.end()) {
      std::vector<std::string> names;
      for (const auto& [name, m] : source.by_name_) {
        if (names.size() == 8) break;
        names.push_back(absl::StrCat("'", name, "'"));
      }
      return absl::NotFoundError(absl::StrCat(
          "job '", job_id, "' rank ", rank, " step ", step, " has no entry '", entry, "'; it has ",
          source.by_name_.size(), ": ", absl::StrJoin(names, ", "),
          source.by_name_.size() > names.size() ? ", ..." : ""));
    }
    const ManifestEntry& m = *it->second;
    if (!RangeWithin(offset, length, m.length())) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " holds ", m.length(), " valid bytes: the range [", offset, ", +", length,
          ") must lie within [0, ", m.length(), ")"));
    }
    return Annotate(
        CopyVerifiedRange(source.payload() + m.offset(), m.length(),
                          source.manifest_.crc_block_bytes(),
                          absl::MakeConstSpan(m.block_crc32c().data(), m.block_crc32c_size()),
                          offset, length, dst),
        what);
  });
}

absl::Status Client::Close(bool drop_snapshots) {
  Wait().IgnoreError();
  if (!registered_) return absl::OkStatus();
  agent::UnregisterRequest request;
  request.set_job_id(job_id_);
  request.set_rank(rank_);
  request.set_drop_snapshots(drop_snapshots);
  agent::UnregisterResponse response;
  grpc::ClientContext context;
  absl::Status status = FromGrpcStatus(stub_->Unregister(NewContext(&context), request, &response));
  registered_ = false;
  return status;
}

Client::Stats Client::stats() const {
  Stats stats;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats = stats_;
  }
  stats.copies = engine_->stats();
  return stats;
}

}  // namespace tessera
