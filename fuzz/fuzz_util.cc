#include "fuzz/fuzz_util.h"

#include <dirent.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace tessera {
namespace fuzz {
namespace {

void PutLe(std::string* out, uint64_t v, size_t n) {
  for (size_t i = 0; i < n; ++i) out->push_back(static_cast<char>(v >> (8 * i)));
}

std::mutex scratch_mu;
std::vector<std::string>* scratch_dirs = nullptr;  // leaked on purpose: used at exit

void RemoveScratch() {
  std::lock_guard<std::mutex> lock(scratch_mu);
  for (const std::string& dir : *scratch_dirs) {
    RemoveFiles(dir);
    rmdir(dir.c_str());
  }
}

}  // namespace

uint8_t Input::U8() { return pos_ < size_ ? data_[pos_++] : 0; }

uint16_t Input::U16() { return static_cast<uint16_t>(U8() | (uint16_t{U8()} << 8)); }

uint32_t Input::U32() { return U16() | (uint32_t{U16()} << 16); }

uint64_t Input::U64() { return U32() | (uint64_t{U32()} << 32); }

std::string Input::Bytes(size_t n) {
  n = std::min(n, left());
  std::string out(reinterpret_cast<const char*>(data_ + pos_), n);
  pos_ += n;
  return out;
}

std::string Input::Piece() { return Bytes(U16()); }

std::string Input::Rest() { return Bytes(left()); }

void PutU8(std::string* out, uint8_t v) { PutLe(out, v, 1); }
void PutU16(std::string* out, uint16_t v) { PutLe(out, v, 2); }
void PutU32(std::string* out, uint32_t v) { PutLe(out, v, 4); }
void PutU64(std::string* out, uint64_t v) { PutLe(out, v, 8); }

void PutPiece(std::string* out, const std::string& piece) {
  PutU16(out, static_cast<uint16_t>(piece.size()));
  out->append(piece, 0, 0xFFFF);
}

void Fail(const std::string& what) {
  std::fprintf(stderr, "invariant broken: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

void Setup(const std::function<std::vector<std::string>()>& seeds) {
  const char* level = std::getenv("TESSERA_FUZZ_LOG");
  SetLogLevel(level != nullptr ? level : "off").IgnoreError();
  const char* dir = std::getenv("TESSERA_FUZZ_WRITE_SEEDS");
  if (dir == nullptr) return;
  const std::vector<std::string> all = seeds();
  for (size_t i = 0; i < all.size(); ++i) {
    char name[32];
    std::snprintf(name, sizeof(name), "seed-%03zu", i);
    if (!WriteFile(absl::StrCat(dir, "/", name), all[i])) {
      std::fprintf(stderr, "cannot write seeds to %s\n", dir);
      std::exit(1);
    }
  }
  std::exit(0);
}

bool Verbose() {
  static const bool verbose = std::getenv("TESSERA_FUZZ_VERBOSE") != nullptr;
  return verbose;
}

std::string ScratchDirectory(const std::string& name) {
  const char* base = std::getenv("TESSERA_FUZZ_SCRATCH");
  std::string pattern =
      absl::StrCat(base != nullptr ? base : "/dev/shm", "/tessera-fuzz-", name, "-XXXXXX");
  if (mkdtemp(pattern.data()) == nullptr) Fail("cannot create a directory in /dev/shm");
  std::lock_guard<std::mutex> lock(scratch_mu);
  if (scratch_dirs == nullptr) {
    scratch_dirs = new std::vector<std::string>();
    std::atexit(RemoveScratch);
  }
  scratch_dirs->push_back(pattern);
  return pattern;
}

void RemoveFiles(const std::string& dir) {
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return;
  std::vector<std::string> names;
  while (dirent* ent = readdir(d)) {
    const std::string name = ent->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  closedir(d);
  for (const std::string& name : names) unlink((dir + "/" + name).c_str());
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

bool WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return static_cast<bool>(out);
}

}  // namespace fuzz
}  // namespace tessera
