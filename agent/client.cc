#include "agent/client.h"

#include <chrono>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/grpc_status.h"
#include "common/logging.h"
#include "common/status.h"
#include "grpcpp/create_channel.h"

namespace tessera {
namespace {

// Bytes to copy: a tensor's whole size, a blob's currently valid length.
uint64_t EntryLength(const Client::Entry& e) {
  return e.spec.kind() == ENTRY_KIND_BLOB ? e.length : e.spec.nbytes();
}

cuda::CopyEngineOptions EngineOptions(const Client::Options& options) {
  cuda::CopyEngineOptions engine;
  engine.staging = options.staging;
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
  // backoff of up to two minutes (snapshots fail, visibly, until then).
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
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
                              : cuda::CopyEngine::CreateHostOnly()) {
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
  job_id_ = job_id;
  rank_ = rank;
  world_size_ = world_size;
  entries_ = std::move(entries);
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
  for (const Entry& e : entries_) *request.add_entries() = e.spec;
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
  Logger("agent")->info("registered job '{}' rank {}/{}: {} entries, slots {} and {}{}", job_id_,
                        rank_, world_size_, entries_.size(), response.slot_paths(0),
                        response.slot_paths(1),
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
  TESSERA_ASSIGN_OR_RETURN(uint64_t ticket, engine_->MarkSnapshotPoint(stream));
  std::vector<Source> sources;
  sources.reserve(entries_.size());
  for (const Entry& e : entries_) sources.push_back({e.data, EntryLength(e)});
  pending_ = Job{step, ticket, std::move(sources)};
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
    absl::Status status = RunSnapshot(job);
    lock.lock();
    busy_ = false;
    last_status_ = status;
    if (status.ok()) {
      ++stats_.sealed;
      stats_.last_sealed_step = job.step;
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

absl::Status Client::RunSnapshot(const Job& job) {
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
  for (int64_t backoff_ms = 2;; backoff_ms = std::min<int64_t>(backoff_ms * 2, 100)) {
    grpc::ClientContext begin_context;
    status = FromGrpcStatus(stub_->BeginSnapshot(NewContext(&begin_context), begin, &begun));
    // kUnavailable: the slot is still being protected, or the daemon is restarting. Skip, or
    // retry for up to rpc_timeout_ms under the wait policy.
    if (!absl::IsUnavailable(status) || options_.when_busy != BusyPolicy::kWait ||
        NowNs() - start_ns > options_.rpc_timeout_ms * 1000000) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(backoff_ms));
  }
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
    if (status.ok()) {
      grpc::ClientContext retry_context;
      status = FromGrpcStatus(stub_->BeginSnapshot(NewContext(&retry_context), begin, &begun));
    }
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
    *m->mutable_spec() = entries_[i].spec;
    m->set_offset(layout_.entry_offsets(i));
    m->set_length(source.length);
  }
  const size_t last = entries_.size() - 1;
  manifest.set_data_bytes(layout_.entry_offsets(last) + entries_[last].spec.nbytes());
  TESSERA_RETURN_IF_ERROR(engine_->IssueCopies(job.ticket, ops));
  TESSERA_RETURN_IF_ERROR(engine_->WaitCopies(job.ticket));
  const size_t manifest_bytes = manifest.ByteSizeLong();
  if (manifest_bytes > layout_.manifest_capacity()) {
    return absl::InternalError(absl::StrCat("manifest of ", manifest_bytes,
                                            " bytes exceeds its reserved ",
                                            layout_.manifest_capacity()));
  }
  manifest.SerializeToArray(slot.payload() + layout_.manifest_offset(),
                            static_cast<int>(manifest_bytes));
  agent::SealSnapshotRequest seal;
  seal.set_job_id(job_id_);
  seal.set_rank(rank_);
  seal.set_step(job.step);
  seal.set_manifest_bytes(manifest_bytes);
  agent::SealSnapshotResponse sealed;
  grpc::ClientContext seal_context;
  TESSERA_RETURN_IF_ERROR(Annotate(
      FromGrpcStatus(stub_->SealSnapshot(NewContext(&seal_context), seal, &sealed)),
      absl::StrCat("SealSnapshot(step ", job.step, ")")));
  std::lock_guard<std::mutex> lock(mu_);
  stats_.bytes_copied += bytes;
  return absl::OkStatus();
}

absl::Status Client::CheckRestorable(const ShardManifest& manifest, uint64_t payload_bytes) const {
  std::vector<std::string> problems;
  if (manifest.job_id() != job_id_ || manifest.rank() != rank_) {
    problems.push_back(absl::StrCat("the snapshot is of job '", manifest.job_id(), "' rank ",
                                    manifest.rank()));
  }
  std::map<std::string, const ManifestEntry*> by_name;
  for (const ManifestEntry& m : manifest.entries()) by_name[m.spec().name()] = &m;
  for (const Entry& e : entries_) {
    auto it = by_name.find(e.spec.name());
    if (it == by_name.end()) {
      problems.push_back(absl::StrCat("'", e.spec.name(), "' is registered but not in the "
                                      "snapshot"));
      continue;
    }
    const ManifestEntry& m = *it->second;
    by_name.erase(it);
    if (m.spec().SerializeAsString() != e.spec.SerializeAsString()) {
      problems.push_back(absl::StrCat("'", e.spec.name(), "' is ", Describe(e.spec),
                                      " now but ", Describe(m.spec()), " in the snapshot"));
    } else if (m.length() > m.spec().nbytes() || m.offset() + m.length() > payload_bytes) {
      problems.push_back(absl::StrCat("'", e.spec.name(), "' lies outside the payload"));
    }
  }
  for (const auto& [name, m] : by_name) {
    problems.push_back(absl::StrCat("'", name, "' is in the snapshot but not registered"));
  }
  if (problems.empty()) return absl::OkStatus();
  const size_t shown = std::min<size_t>(problems.size(), 8);
  std::vector<std::string> head(problems.begin(), problems.begin() + shown);
  return absl::FailedPreconditionError(absl::StrCat(
      "step ", manifest.step(), " does not match the registered state, so nothing was restored: ",
      absl::StrJoin(head, "; "),
      problems.size() > shown ? absl::StrCat("; and ", problems.size() - shown, " more") : ""));
}

absl::StatusOr<int64_t> Client::Restore(int64_t step) {
  if (!registered_) return absl::FailedPreconditionError("Restore before Register");
  Wait().IgnoreError();
  if (step < 0) {
    // The newest step every rank of the job can restore, so that all ranks resume together.
    agent::FindLatestRestorableRequest find;
    find.set_job_id(job_id_);
    find.set_resume(true);
    find.set_rank(rank_);
    agent::FindLatestRestorableResponse found;
    grpc::ClientContext find_context;
    TESSERA_RETURN_IF_ERROR(FromGrpcStatus(
        stub_->FindLatestRestorable(NewContext(&find_context), find, &found)));
    step = found.step();
  }
  agent::PrepareRestoreRequest request;
  request.set_job_id(job_id_);
  request.set_rank(rank_);
  request.set_step(step);
  agent::PrepareRestoreResponse response;
  grpc::ClientContext context;
  TESSERA_RETURN_IF_ERROR(
      FromGrpcStatus(stub_->PrepareRestore(NewContext(&context), request, &response)));

  // Read from our own (pinned) mapping when the step sits in one of our slots.
  const Segment* source = nullptr;
  for (const auto& slot : slots_) {
    if (slot.segment->path() == response.segment_path()) source = slot.segment.get();
  }
  std::unique_ptr<Segment> opened;
  bool pinned_here = false;
  if (source == nullptr) {
    TESSERA_ASSIGN_OR_RETURN(opened, Segment::Open(response.segment_path(), /*writable=*/false));
    source = opened.get();
    if (engine_->has_gpu()) {
      pinned_here = engine_->RegisterHost(const_cast<SegmentHeader*>(source->header()),
                                          source->file_bytes()).ok();
    }
  }
  auto unpin = [&] {
    if (pinned_here) engine_->UnregisterHost(const_cast<SegmentHeader*>(source->header())).IgnoreError();
  };
  if (response.payload_bytes() > source->capacity_bytes() ||
      response.manifest_offset() + response.manifest_bytes() > response.payload_bytes()) {
    unpin();
    return absl::DataLossError(absl::StrCat("restore of step ", response.step(),
                                            ": the daemon's payload bounds do not fit ",
                                            response.segment_path()));
  }
  ShardManifest manifest;
  if (!manifest.ParseFromArray(source->payload() + response.manifest_offset(),
                               static_cast<int>(response.manifest_bytes()))) {
    unpin();
    return absl::DataLossError(absl::StrCat("the manifest of step ", response.step(), " in ",
                                            response.segment_path(), " does not parse"));
  }
  if (absl::Status s = CheckRestorable(manifest, response.payload_bytes()); !s.ok()) {
    unpin();
    return s;
  }
  std::map<std::string, const ManifestEntry*> by_name;
  for (const ManifestEntry& m : manifest.entries()) by_name[m.spec().name()] = &m;
  std::vector<cuda::CopyOp> ops;
  for (const Entry& e : entries_) {
    const ManifestEntry& m = *by_name[e.spec.name()];
    ops.push_back({e.data, source->payload() + m.offset(), m.length()});
  }
  absl::Status copied = engine_->CopySync(ops);
  unpin();
  TESSERA_RETURN_IF_ERROR(Annotate(copied, absl::StrCat("restoring step ", response.step())));
  for (Entry& e : entries_) e.length = by_name[e.spec.name()]->length();
  Logger("agent")->info("restored job '{}' rank {} step {} ({} payload bytes)", job_id_, rank_,
                        response.step(), response.payload_bytes());
  return response.step();
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
