#include "daemon/coordination/job_state_journal.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/crc32c.h"
#include "common/status.h"
#include "daemon/coordination/messages.h"
#include "daemon/store/snapshot_store.h"
#include "proto/coordination.pb.h"

namespace tessera {
namespace {

constexpr uint32_t kMagic = 0x534a5354;  // "TSJS" as little-endian bytes
constexpr uint32_t kFormat = 1;

// In host byte order, as the segment headers are: the files never leave their machine.
struct FileHeader {
  uint32_t magic;
  uint32_t format;
  uint32_t body_bytes;
  uint32_t body_crc32c;
};
constexpr size_t kHeaderBytes = sizeof(FileHeader);
static_assert(kHeaderBytes == 16);

// Writes all of `bytes` to `fd`.
absl::Status WriteAll(int fd, const std::string& bytes, const std::string& path) {
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoStatus(errno, "write " + path);
    done += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

// The file's bytes, at most `limit` + 1 of them (so that a larger file is seen to be larger).
absl::Status ReadBounded(const std::string& path, size_t limit, std::string* out) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return ErrnoStatus(errno, "open " + path);
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return absl::DataLossError("not a regular file");
  }
  out->assign(std::min<size_t>(static_cast<size_t>(st.st_size), limit + 1), '\0');
  size_t done = 0;
  while (done < out->size()) {
    const ssize_t n = read(fd, out->data() + done, out->size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  close(fd);
  out->resize(done);
  return absl::OkStatus();
}

}  // namespace

std::string JobStateJournal::PathOf(const std::string& job_id) const {
  return absl::StrCat(directory_, "/", job_id, kSuffix);
}

std::string JobStateJournal::Encode(const JobState& state) {
  coordination::JobState proto;
  JobState kept = state;
  kept.dead_steps.clear();
  coordination_wire::ToProto(kept, &proto);
  const std::string body = proto.SerializeAsString();
  const FileHeader header{kMagic, kFormat, static_cast<uint32_t>(body.size()),
                          Crc32c(body.data(), body.size())};
  std::string bytes(reinterpret_cast<const char*>(&header), kHeaderBytes);
  return bytes + body;
}

absl::Status JobStateJournal::Decode(const std::string& job_id, const std::string& bytes,
                                     JobState* out) {
  if (bytes.size() < kHeaderBytes) {
    return absl::DataLossError(
        absl::StrCat(bytes.size(), " bytes, shorter than the ", kHeaderBytes, "-byte header"));
  }
  if (bytes.size() > kMaxFileBytes) {
    return absl::DataLossError(
        absl::StrCat("larger than the ", kMaxFileBytes, " bytes a job's state file may have"));
  }
  FileHeader header;
  std::memcpy(&header, bytes.data(), kHeaderBytes);
  const uint64_t length = header.body_bytes;
  const uint32_t crc = header.body_crc32c;
  if (header.magic != kMagic) return absl::DataLossError("not a job state file (bad magic)");
  if (header.format != kFormat) {
    return absl::DataLossError(
        absl::StrCat("format ", header.format, ", but this daemon reads format ", kFormat));
  }
  if (length != bytes.size() - kHeaderBytes) {
    return absl::DataLossError(absl::StrCat("its header says ", length, " bytes of state, but ",
                                            bytes.size() - kHeaderBytes, " follow it"));
  }
  const uint32_t actual = Crc32c(bytes.data() + kHeaderBytes, length);
  if (actual != crc) {
    return absl::DataLossError(
        absl::StrCat("CRC32C 0x", absl::Hex(actual), ", but its header says 0x", absl::Hex(crc)));
  }
  coordination::JobState proto;
  if (!proto.ParseFromArray(bytes.data() + kHeaderBytes, static_cast<int>(length))) {
    return absl::DataLossError("its state does not parse");
  }
  if (proto.job_id() != job_id) {
    return absl::DataLossError(absl::StrCat("it holds the state of job '", proto.job_id(),
                                            "', but is named for job '", job_id, "'"));
  }
  if (absl::Status s = coordination_wire::FromProto(proto, out); !s.ok()) {
    return absl::DataLossError(absl::StrCat("its state is not valid: ", s.message()));
  }
  return absl::OkStatus();
}

absl::Status JobStateJournal::Save(const JobState& state) const {
  if (directory_.empty()) return absl::OkStatus();
  const std::string path = PathOf(state.job_id);
  const std::string temporary = path + ".new";
  const int fd =
      open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return ErrnoStatus(errno, "create " + temporary);
  absl::Status written = WriteAll(fd, Encode(state), temporary);
  if (written.ok() && fdatasync(fd) != 0) written = ErrnoStatus(errno, "sync " + temporary);
  close(fd);
  if (written.ok() && rename(temporary.c_str(), path.c_str()) != 0) {
    written = ErrnoStatus(errno, "rename " + temporary + " to " + path);
  }
  if (!written.ok()) {
    unlink(temporary.c_str());
    return written;
  }
  // The rename is durable once the directory is (on a disk; on a tmpfs this costs nothing).
  const int dir = open(directory_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir < 0) return ErrnoStatus(errno, "open " + directory_);
  if (fsync(dir) != 0) written = ErrnoStatus(errno, "sync " + directory_);
  close(dir);
  return written;
}

void JobStateJournal::Remove(const std::string& job_id) const {
  if (directory_.empty()) return;
  unlink(PathOf(job_id).c_str());
}

int JobStateJournal::RemoveAll() const {
  if (directory_.empty()) return 0;
  const std::string replacement_suffix = std::string(kSuffix) + ".new";
  int removed = 0;
  if (DIR* d = opendir(directory_.c_str())) {
    while (dirent* e = readdir(d)) {
      const std::string name = e->d_name;
      if (!absl::EndsWith(name, kSuffix) && !absl::EndsWith(name, replacement_suffix)) continue;
      removed += unlink((directory_ + "/" + name).c_str()) == 0;
    }
    closedir(d);
  }
  return removed;
}

JobStateJournal::Loaded JobStateJournal::Load() const {
  Loaded loaded;
  if (directory_.empty()) return loaded;
  std::vector<std::string> names;
  if (DIR* d = opendir(directory_.c_str())) {
    while (dirent* e = readdir(d)) {
      const std::string name = e->d_name;
      if (name.size() <= strlen(kSuffix) || !absl::EndsWith(name, kSuffix)) continue;
      if (names.size() == kMaxFiles) {
        loaded.refused.push_back(absl::StrCat(name, " and any later file: more than ", kMaxFiles,
                                              " job state files; these are not read"));
        break;
      }
      names.push_back(name);
    }
    closedir(d);
  }
  std::sort(names.begin(), names.end());
  for (const std::string& name : names) {
    const std::string job_id = name.substr(0, name.size() - strlen(kSuffix));
    std::string bytes;
    absl::Status status = ValidateJobId(job_id);
    if (status.ok()) status = ReadBounded(directory_ + "/" + name, kMaxFileBytes, &bytes);
    JobState state;
    if (status.ok()) status = Decode(job_id, bytes, &state);
    if (status.ok()) {
      loaded.states.push_back(std::move(state));
    } else {
      loaded.refused.push_back(absl::StrCat(name, ": ", status.message()));
    }
  }
  return loaded;
}

}  // namespace tessera
