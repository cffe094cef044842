#include "tests/gpu/gpu_state.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "cuda/copy_engine.h"
#include "tests/gpu/gpu_state_kernels.h"

namespace tessera::testing::gpu {
namespace {

absl::Status Cuda(cudaError_t error, absl::string_view call) {
  return cuda::CudaStatus(error, call);
}

uint64_t BlobCheck(uint64_t seed, int64_t step) {
  return SplitMix64(seed * 0x51 + static_cast<uint64_t>(step));
}

}  // namespace

std::string NoGpuReason() {
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    return absl::StrCat("no usable CUDA device: ", cudaGetErrorName(error), " (",
                        cudaGetErrorString(error), ")");
  }
  if (count == 0) return "no CUDA device found";
  return "";
}

absl::StatusOr<std::unique_ptr<GpuState>> GpuState::Create(const GpuLayout& layout,
                                                           cudaStream_t stream) {
  static const std::pair<const char*, uint64_t> kDtypes[] = {
      {"float32", 4}, {"bfloat16", 2}, {"uint8", 1}, {"int64", 8}, {"float64", 8}, {"float16", 2}};
  std::unique_ptr<GpuState> state(new GpuState(layout, stream));
  const uint64_t seed = layout.seed;
  const double lo = std::log(std::max<double>(layout.min_bytes, 1));
  const double hi = std::log(std::max<double>(layout.max_bytes, layout.min_bytes));
  for (int i = 0; i < layout.tensors; ++i) {
    const auto& [dtype, item] = kDtypes[SplitMix64(seed + i) % 6];
    const double u = (SplitMix64(seed * 3 + i) % 1000000) / 1e6;
    uint64_t bytes = static_cast<uint64_t>(std::exp(lo + (hi - lo) * u));
    const uint64_t left =
        layout.total_bytes > state->device_bytes_ ? layout.total_bytes - state->device_bytes_ : 0;
    bytes = std::min(bytes, left);
    const uint64_t elements = std::max<uint64_t>(bytes / item, 1);
    Tensor t;
    t.spec.set_name(absl::StrCat("layer", i, ".", dtype));
    t.spec.set_dtype(dtype);
    t.spec.set_kind(ENTRY_KIND_TENSOR);
    if (elements % 3 == 0) {
      t.spec.add_shape(3);
      t.spec.add_shape(static_cast<int64_t>(elements / 3));
    } else {
      t.spec.add_shape(static_cast<int64_t>(elements));
    }
    t.bytes = elements * item;
    t.spec.set_nbytes(t.bytes);
    TESSERA_RETURN_IF_ERROR(
        Cuda(cudaMalloc(&t.data, t.bytes), absl::StrCat("cudaMalloc(", t.bytes, " bytes)")));
    state->device_bytes_ += t.bytes;
    state->tensors_.push_back(std::move(t));
  }
  TESSERA_RETURN_IF_ERROR(
      Cuda(cudaMalloc(reinterpret_cast<void**>(&state->mismatches_),
                      sizeof(unsigned long long) * std::max<size_t>(state->tensors_.size(), 1)),
           "cudaMalloc(counters)"));
  return state;
}

GpuState::~GpuState() {
  cudaStreamSynchronize(stream_);
  for (Tensor& t : tensors_) cudaFree(t.data);
  if (mismatches_ != nullptr) cudaFree(mismatches_);
}

absl::Status GpuState::Fill(int64_t step) {
  for (size_t i = 0; i < tensors_.size(); ++i) {
    TESSERA_RETURN_IF_ERROR(Cuda(
        FillState(tensors_[i].data, tensors_[i].bytes, layout_.seed, i, step, stream_),
        "FillState"));
  }
  blob_ = {step, BlobCheck(layout_.seed, step)};
  return absl::OkStatus();
}

absl::Status GpuState::Advance(int64_t from, int64_t to) {
  for (size_t i = 0; i < tensors_.size(); ++i) {
    TESSERA_RETURN_IF_ERROR(Cuda(
        AdvanceState(tensors_[i].data, tensors_[i].bytes, layout_.seed, i, from, to, stream_),
        "AdvanceState"));
  }
  blob_ = {to, BlobCheck(layout_.seed, to)};
  return absl::OkStatus();
}

absl::Status GpuState::Scramble(uint64_t salt) {
  for (size_t i = 0; i < tensors_.size(); ++i) {
    TESSERA_RETURN_IF_ERROR(Cuda(
        FillNoise(tensors_[i].data, tensors_[i].bytes, salt * 1000003 + i, stream_), "FillNoise"));
  }
  blob_ = {-12345, salt};
  return absl::OkStatus();
}

absl::StatusOr<std::string> GpuState::Check(int64_t step) {
  const size_t n = tensors_.size();
  TESSERA_RETURN_IF_ERROR(Cuda(
      cudaMemsetAsync(mismatches_, 0, sizeof(unsigned long long) * std::max<size_t>(n, 1), stream_),
      "cudaMemsetAsync"));
  for (size_t i = 0; i < n; ++i) {
    TESSERA_RETURN_IF_ERROR(Cuda(CountStateMismatches(tensors_[i].data, tensors_[i].bytes,
                                                      layout_.seed, i, step, mismatches_ + i,
                                                      stream_),
                                 "CountStateMismatches"));
  }
  std::vector<unsigned long long> counts(std::max<size_t>(n, 1));
  TESSERA_RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(counts.data(), mismatches_,
                                               sizeof(unsigned long long) * counts.size(),
                                               cudaMemcpyDeviceToHost, stream_),
                               "cudaMemcpyAsync(counters)"));
  TESSERA_RETURN_IF_ERROR(Cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"));
  std::string diff;
  int listed = 0, bad = 0;
  uint64_t bad_bytes = 0;
  for (size_t i = 0; i < n; ++i) {
    if (counts[i] == 0) continue;
    ++bad;
    bad_bytes += counts[i];
    if (listed++ < 5) {
      absl::StrAppend(&diff, diff.empty() ? "" : "; ", "tensor ", i, " ('",
                      tensors_[i].spec.name(), "', ", tensors_[i].bytes, " bytes): ", counts[i],
                      " bytes differ");
    }
  }
  if (bad > 0) {
    diff = absl::StrCat(bad, " of ", n, " tensors (", bad_bytes, " bytes) differ from step ",
                        step, ": ", diff);
  }
  if (blob_.step != step || blob_.check != BlobCheck(layout_.seed, step)) {
    absl::StrAppend(&diff, diff.empty() ? "" : "; ", "host blob holds step ", blob_.step,
                    ", expected ", step);
  }
  return diff;
}

std::vector<Client::Entry> GpuState::ClientEntries() {
  std::vector<Client::Entry> entries;
  for (Tensor& t : tensors_) entries.push_back({t.spec, t.data, t.bytes});
  EntrySpec blob;
  blob.set_name("trainer_step");
  blob.set_dtype("bytes");
  blob.set_kind(ENTRY_KIND_BLOB);
  blob.set_nbytes(sizeof(StepBlob));
  entries.push_back({blob, &blob_, sizeof(StepBlob)});
  return entries;
}

}  // namespace tessera::testing::gpu
