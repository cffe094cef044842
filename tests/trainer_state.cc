#include "tests/trainer_state.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace tessera::testing {
namespace {

uint64_t SplitMix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t StepMask(uint64_t seed, size_t entry, int64_t step) {
  return step == 0 ? 0 : SplitMix(seed * 31 + entry * 1000003 + static_cast<uint64_t>(step));
}

// Blobs are rewritten whole each step: their length changes too.
uint64_t BlobLength(uint64_t seed, int64_t step) { return 1 + SplitMix(seed ^ step) % 4096; }

void FillBlob(uint64_t seed, int64_t step, StateEntry* e) {
  e->length = BlobLength(seed, step);
  for (uint64_t i = 0; i < e->length; ++i) {
    e->bytes[i] = static_cast<uint8_t>(SplitMix(seed + step * 7919 + i));
  }
}

void XorWords(std::vector<uint8_t>* bytes, uint64_t mask) {
  uint8_t* p = bytes->data();
  const size_t n = bytes->size();
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    w ^= mask;
    std::memcpy(p + i, &w, 8);
  }
  for (; i < n; ++i) p[i] ^= static_cast<uint8_t>(mask >> (8 * (i % 8)));
}

// Step 0 contents of tensor `index`.
void FillBase(uint64_t seed, size_t index, std::vector<uint8_t>* bytes) {
  uint64_t x = SplitMix(seed ^ (0xABCDEFull * (index + 1)));
  const size_t whole = bytes->size() / 8 * 8;
  for (size_t b = 0; b < whole; b += 8) {
    x = SplitMix(x);
    std::memcpy(bytes->data() + b, &x, 8);
  }
  for (size_t b = whole; b < bytes->size(); ++b) (*bytes)[b] = static_cast<uint8_t>(SplitMix(x + b));
}

}  // namespace

std::vector<StateEntry> MakeState(uint64_t seed, int tensors, uint64_t min_bytes,
                                  uint64_t max_bytes, uint64_t total_bytes) {
  static const std::pair<const char*, uint64_t> kDtypes[] = {
      {"float32", 4}, {"bfloat16", 2}, {"uint8", 1}, {"int64", 8}, {"float64", 8}, {"float16", 2}};
  std::vector<StateEntry> state;
  uint64_t total = 0;
  const double lo = std::log(std::max<double>(min_bytes, 1));
  const double hi = std::log(std::max<double>(max_bytes, min_bytes));
  for (int i = 0; i < tensors; ++i) {
    const auto& [dtype, item] = kDtypes[SplitMix(seed + i) % 6];
    double u = (SplitMix(seed * 3 + i) % 1000000) / 1e6;
    uint64_t bytes = static_cast<uint64_t>(std::exp(lo + (hi - lo) * u));
    bytes = std::min(bytes, total_bytes > total ? total_bytes - total : 0);
    uint64_t elements = std::max<uint64_t>(bytes / item, 1);
    StateEntry e;
    e.spec.set_name(absl::StrCat("layer", i, ".", dtype));
    e.spec.set_dtype(dtype);
    e.spec.set_kind(ENTRY_KIND_TENSOR);
    // 2-D when it divides evenly, to exercise shapes.
    if (elements % 3 == 0) {
      e.spec.add_shape(3);
      e.spec.add_shape(elements / 3);
    } else {
      e.spec.add_shape(elements);
    }
    e.spec.set_nbytes(elements * item);
    e.bytes.resize(elements * item);
    e.length = e.bytes.size();
    FillBase(seed, i, &e.bytes);
    total += e.bytes.size();
    state.push_back(std::move(e));
  }
  StateEntry blob;
  blob.spec.set_name("user_state");
  blob.spec.set_dtype("bytes");
  blob.spec.set_kind(ENTRY_KIND_BLOB);
  blob.spec.set_nbytes(4096);
  blob.bytes.resize(4096);
  FillBlob(seed, 0, &blob);
  state.push_back(std::move(blob));
  return state;
}

void AdvanceState(uint64_t seed, std::vector<StateEntry>* state, int64_t from, int64_t to) {
  for (size_t i = 0; i < state->size(); ++i) {
    StateEntry& e = (*state)[i];
    if (e.spec.kind() == ENTRY_KIND_BLOB) {
      FillBlob(seed, to, &e);
    } else {
      XorWords(&e.bytes, StepMask(seed, i, from) ^ StepMask(seed, i, to));
    }
  }
}

std::string CheckState(uint64_t seed, const std::vector<StateEntry>& state, int64_t step) {
  std::vector<StateEntry> expected;
  {
    // Rebuild the layout from the same seed, then move it to `step`.
    int tensors = static_cast<int>(state.size()) - 1;
    expected.reserve(state.size());
    for (int i = 0; i < tensors; ++i) {
      StateEntry e;
      e.spec = state[i].spec;
      e.bytes.resize(state[i].bytes.size());
      FillBase(seed, i, &e.bytes);
      XorWords(&e.bytes, StepMask(seed, i, step));
      e.length = e.bytes.size();
      expected.push_back(std::move(e));
    }
    StateEntry blob;
    blob.bytes.resize(4096);
    FillBlob(seed, step, &blob);
    expected.push_back(std::move(blob));
  }
  for (size_t i = 0; i < state.size(); ++i) {
    const StateEntry& got = state[i];
    const StateEntry& want = expected[i];
    if (got.length != want.length) {
      return absl::StrCat("entry ", i, " ('", got.spec.name(), "') length ", got.length,
                          ", expected ", want.length);
    }
    for (uint64_t b = 0; b < want.length; ++b) {
      if (got.bytes[b] != want.bytes[b]) {
        return absl::StrCat("entry ", i, " ('", got.spec.name(), "') byte ", b, " is ",
                            int{got.bytes[b]}, ", expected ", int{want.bytes[b]}, " at step ",
                            step);
      }
    }
  }
  return "";
}

void Scramble(std::vector<StateEntry>* state, uint64_t salt) {
  for (auto& e : *state) {
    for (size_t b = 0; b < e.bytes.size(); ++b) e.bytes[b] = static_cast<uint8_t>(SplitMix(salt + b) | 1);
    e.length = e.spec.kind() == ENTRY_KIND_BLOB ? 0 : e.bytes.size();
  }
}

std::vector<Client::Entry> ClientEntries(std::vector<StateEntry>* state) {
  std::vector<Client::Entry> entries;
  for (auto& e : *state) entries.push_back({e.spec, e.bytes.data(), e.length});
  return entries;
}

}  // namespace tessera::testing
