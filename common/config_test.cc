#include "common/config.h"

#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::StartsWith;

ConfigSchema TestSchema() {
  absl::StatusOr<ConfigSchema> schema = ConfigSchema::Create({
      ConfigKey::String("name", "tessera", "A top-level key, rendered before any table."),
      ConfigKey::ByteSize("store.capacity_bytes", int64_t{64} << 30,
                          "Shared memory this daemon may use for snapshots and fragments.",
                          InRange(0, std::numeric_limits<int64_t>::max())),
      ConfigKey::Bool("store.prefault", true, "Touch every page of a new segment."),
      ConfigKey::Int64("store.crc_threads", 4, "Threads used to checksum a sealed payload.",
                       InRange(1, 64)),
      ConfigKey::Double("peer.backoff_factor", 1.5, "Multiplier between retries.",
                        DoubleInRange(1.0, 10.0)),
      ConfigKey::StringList("peer.members", {"a", "b"}, "Static list of cluster members."),
      ConfigKey::String("log.level", "info", "Least severe level written.",
                        OneOf({"debug", "info", "warn"})),
      ConfigKey::Int64("store.deep.nested_ms", -7, "A key two tables deep, declared late."),
  });
  EXPECT_TRUE(schema.ok()) << schema.status();
  return *schema;
}

absl::StatusOr<Config> Load(const std::string& toml,
                            const std::vector<std::string>& overrides = {}) {
  return LoadConfigFromString(TestSchema(), toml, "test.toml", overrides);
}

std::string ErrorOf(const std::string& toml, const std::vector<std::string>& overrides = {}) {
  absl::StatusOr<Config> config = Load(toml, overrides);
  if (config.ok()) return "(loaded)";
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument) << config.status();
  return std::string(config.status().message());
}

void ExpectDefaults(const Config& config) {
  EXPECT_EQ(config.GetString("name"), "tessera");
  EXPECT_EQ(config.GetByteSize("store.capacity_bytes"), int64_t{64} << 30);
  EXPECT_TRUE(config.GetBool("store.prefault"));
  EXPECT_EQ(config.GetInt64("store.crc_threads"), 4);
  EXPECT_EQ(config.GetDouble("peer.backoff_factor"), 1.5);
  EXPECT_THAT(config.GetStringList("peer.members"), ElementsAre("a", "b"));
  EXPECT_EQ(config.GetString("log.level"), "info");
  EXPECT_EQ(config.GetInt64("store.deep.nested_ms"), -7);
}

// --- Byte sizes ---------------------------------------------------------------------------------

TEST(ParseByteSizeTest, AcceptsIntegersAndUnits) {
  EXPECT_EQ(*ParseByteSize("0"), 0);
  EXPECT_EQ(*ParseByteSize("4096"), 4096);
  EXPECT_EQ(*ParseByteSize("1KiB"), 1024);
  EXPECT_EQ(*ParseByteSize("1KB"), 1000);
  EXPECT_EQ(*ParseByteSize("1kb"), 1000);
  EXPECT_EQ(*ParseByteSize("512MiB"), int64_t{512} << 20);
  EXPECT_EQ(*ParseByteSize("64GiB"), int64_t{64} << 30);
  EXPECT_EQ(*ParseByteSize("64 GiB"), int64_t{64} << 30);
  EXPECT_EQ(*ParseByteSize(" 64gib "), int64_t{64} << 30);
  EXPECT_EQ(*ParseByteSize("1.5TB"), int64_t{1500} * 1000 * 1000 * 1000);
  EXPECT_EQ(*ParseByteSize("1.5KiB"), 1536);
  EXPECT_EQ(*ParseByteSize("0.5KiB"), 512);
  EXPECT_EQ(*ParseByteSize(".5KiB"), 512);
  EXPECT_EQ(*ParseByteSize("1.1KiB"), 1126);  // 1126.4, rounded down
  EXPECT_EQ(*ParseByteSize("12B"), 12);
  EXPECT_EQ(*ParseByteSize("2PiB"), int64_t{2} << 50);
  EXPECT_EQ(*ParseByteSize("9223372036854775807"), std::numeric_limits<int64_t>::max());
}

TEST(ParseByteSizeTest, RejectsWithReason) {
  auto message = [](const char* text) {
    absl::StatusOr<int64_t> bytes = ParseByteSize(text);
    EXPECT_EQ(bytes.status().code(), absl::StatusCode::kInvalidArgument) << text;
    return std::string(bytes.status().message());
  };
  EXPECT_EQ(message(""), "\"\" is not a byte size: it is empty");
  EXPECT_EQ(message("-1"), "\"-1\" is not a byte size: a size cannot be negative");
  EXPECT_EQ(message("-1KiB"), "\"-1KiB\" is not a byte size: a size cannot be negative");
  EXPECT_THAT(message("garbage"), HasSubstr("expected a number of bytes followed by an optional"));
  EXPECT_THAT(message("64Gigs"),
              HasSubstr("unknown unit \"Gigs\"; the units are B, KB, MB, GB, TB, PB, KiB"));
  EXPECT_THAT(message("64G"), HasSubstr("unknown unit \"G\""));
  EXPECT_THAT(message("1.5"), HasSubstr("a fraction needs a unit of KB or larger"));
  EXPECT_THAT(message("1.5B"), HasSubstr("a fraction needs a unit of KB or larger"));
  EXPECT_THAT(message("9223372036854775808"), HasSubstr("more than 9223372036854775807 bytes"));
  EXPECT_THAT(message("8192PiB"), HasSubstr("more than 9223372036854775807 bytes"));
  EXPECT_THAT(message("1e9"), HasSubstr("unknown unit \"e9\""));
  EXPECT_THAT(message("0x10"), HasSubstr("unknown unit \"x10\""));
  EXPECT_THAT(message("1 2"), HasSubstr("unknown unit \"2\""));
}

TEST(FormatByteSizeTest, UsesLargestExactIecUnit) {
  EXPECT_EQ(FormatByteSize(0), "0");
  EXPECT_EQ(FormatByteSize(1000), "1000");
  EXPECT_EQ(FormatByteSize(1024), "1KiB");
  EXPECT_EQ(FormatByteSize(1536), "1536");
  EXPECT_EQ(FormatByteSize(int64_t{64} << 30), "64GiB");
  EXPECT_EQ(FormatByteSize(int64_t{3} << 50), "3PiB");
  EXPECT_EQ(FormatByteSize(int64_t{4096} << 50), "4096PiB");
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{1023}, int64_t{1} << 40, int64_t{5} << 21,
                    std::numeric_limits<int64_t>::max(), int64_t{1} << 62}) {
    EXPECT_EQ(*ParseByteSize(FormatByteSize(n)), n) << n;
  }
}

// --- Schema -------------------------------------------------------------------------------------

std::string SchemaError(std::vector<ConfigKey> keys) {
  absl::StatusOr<ConfigSchema> schema = ConfigSchema::Create(std::move(keys));
  if (schema.ok()) return "(created)";
  EXPECT_EQ(schema.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(schema.status().message());
}

TEST(ConfigSchemaTest, RejectsBadDeclarations) {
  EXPECT_EQ(SchemaError({ConfigKey::Bool("a.b", true, "d"), ConfigKey::Bool("a.b", false, "d")}),
            "config schema: key \"a.b\": declared twice");
  EXPECT_THAT(SchemaError({ConfigKey::Bool("a..b", true, "d")}),
              HasSubstr("key \"a..b\": a name is dot-separated parts"));
  EXPECT_THAT(SchemaError({ConfigKey::Bool("a b", true, "d")}), HasSubstr("key \"a b\""));
  EXPECT_THAT(SchemaError({ConfigKey::Bool("", true, "d")}), HasSubstr("key \"\""));
  EXPECT_EQ(SchemaError({ConfigKey::Bool("store", true, "d"), ConfigKey::Bool("store.x", 1, "d")}),
            "config schema: key \"store\" is also the table of key \"store.x\"");
  EXPECT_EQ(SchemaError({ConfigKey::Bool("a", true, "")}), "config schema: key \"a\": has no doc");
  EXPECT_EQ(SchemaError({ConfigKey::Int64("a", 0, "d", InRange(1, 2))}),
            "config schema: key \"a\": the default fails its validator: must be 1 to 2, got 0");
  EXPECT_THAT(SchemaError({ConfigKey::String("a", "x", "d", InRange(1, 2))}),
              HasSubstr("InRange applies to integers only"));
  EXPECT_EQ(SchemaError({ConfigKey::ByteSize("a", -1, "d")}),
            "config schema: key \"a\": a byte size default cannot be negative");
  ConfigKey mistyped = ConfigKey::Bool("a", true, "d");
  mistyped.type = ConfigType::kDouble;
  EXPECT_EQ(SchemaError({mistyped}),
            "config schema: key \"a\": the default does not have type double");
}

TEST(ConfigSchemaTest, FindsKeys) {
  ConfigSchema schema = TestSchema();
  ASSERT_NE(schema.Find("store.crc_threads"), nullptr);
  EXPECT_EQ(schema.Find("store.crc_threads")->type, ConfigType::kInt64);
  EXPECT_EQ(schema.Find("store"), nullptr);
  EXPECT_EQ(schema.Find("crc_threads"), nullptr);
  EXPECT_EQ(schema.keys().size(), 8u);
}

// --- Loading ------------------------------------------------------------------------------------

TEST(LoadConfigTest, NothingGivenMeansDefaults) {
  absl::StatusOr<Config> config = Load("");
  ASSERT_TRUE(config.ok()) << config.status();
  ExpectDefaults(*config);
  ExpectDefaults(Config(TestSchema()));
}

TEST(LoadConfigTest, ReadsEveryTypeFromFile) {
  absl::StatusOr<Config> config = Load(R"(
name = "other"
[store]
capacity_bytes = "512MiB"
prefault = false
crc_threads = 16
deep.nested_ms = 30_000
[peer]
backoff_factor = 2   # an integer is a fine number
members = ["x", "y", "z"]
[log]
level = 'debug'
)");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->GetString("name"), "other");
  EXPECT_EQ(config->GetByteSize("store.capacity_bytes"), int64_t{512} << 20);
  EXPECT_FALSE(config->GetBool("store.prefault"));
  EXPECT_EQ(config->GetInt64("store.crc_threads"), 16);
  EXPECT_EQ(config->GetInt64("store.deep.nested_ms"), 30000);
  EXPECT_EQ(config->GetDouble("peer.backoff_factor"), 2.0);
  EXPECT_THAT(config->GetStringList("peer.members"), ElementsAre("x", "y", "z"));
  EXPECT_EQ(config->GetString("log.level"), "debug");
}

TEST(LoadConfigTest, DottedKeysAndInlineTablesWork) {
  absl::StatusOr<Config> config =
      Load("store.crc_threads = 8\npeer = { members = [] }\nstore.capacity_bytes = 4096\n");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->GetInt64("store.crc_threads"), 8);
  EXPECT_TRUE(config->GetStringList("peer.members").empty());
  EXPECT_EQ(config->GetByteSize("store.capacity_bytes"), 4096);
}

TEST(LoadConfigTest, OverridesWinOverFileAndApplyInOrder) {
  absl::StatusOr<Config> config =
      Load("[store]\ncrc_threads = 8\nprefault = false\n",
           {"store.crc_threads=16", "store.crc_threads = 32", "log.level=warn"});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->GetInt64("store.crc_threads"), 32);
  EXPECT_FALSE(config->GetBool("store.prefault"));  // from the file, not overridden
  EXPECT_EQ(config->GetString("log.level"), "warn");
}

TEST(LoadConfigTest, OverrideValuesFollowTheKeyType) {
  absl::StatusOr<Config> config = Load(
      "", {"store.prefault=false", "store.crc_threads=0x10", "peer.backoff_factor=3",
           "name=true",  // a string key takes the text as is
           "store.capacity_bytes=1.5TB", "peer.members=p1, p2 ,p3", "store.deep.nested_ms=-1_000"});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_FALSE(config->GetBool("store.prefault"));
  EXPECT_EQ(config->GetInt64("store.crc_threads"), 16);
  EXPECT_EQ(config->GetDouble("peer.backoff_factor"), 3.0);
  EXPECT_EQ(config->GetString("name"), "true");
  EXPECT_EQ(config->GetByteSize("store.capacity_bytes"), int64_t{1500} * 1000 * 1000 * 1000);
  EXPECT_THAT(config->GetStringList("peer.members"), ElementsAre("p1", "p2", "p3"));
  EXPECT_EQ(config->GetInt64("store.deep.nested_ms"), -1000);
}

TEST(LoadConfigTest, OverrideAcceptsTomlSyntaxForStringsListsAndSizes) {
  absl::StatusOr<Config> config =
      Load("", {"name=\"a=b, \\\"quoted\\\"\"", "peer.members=[\"x,y\", 'z']",
                "store.capacity_bytes=\"64GiB\"", "store.deep.nested_ms=5"});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->GetString("name"), "a=b, \"quoted\"");
  EXPECT_THAT(config->GetStringList("peer.members"), ElementsAre("x,y", "z"));
  EXPECT_EQ(config->GetByteSize("store.capacity_bytes"), int64_t{64} << 30);

  config = Load("", {"peer.members=", "name=", "store.capacity_bytes=4096"});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(config->GetStringList("peer.members").empty());
  EXPECT_EQ(config->GetString("name"), "");
  EXPECT_EQ(config->GetByteSize("store.capacity_bytes"), 4096);
}

TEST(LoadConfigErrorTest, WrongTypeInFileNamesFileLineKeyAndExpectation) {
  EXPECT_EQ(ErrorOf("[store]\ncapacity_bytes = true\n"),
            "test.toml:2:18: store.capacity_bytes: expected a byte size such as 68719476736 or "
            "\"64GiB\", got true");
  EXPECT_EQ(ErrorOf("[store]\ncrc_threads = \"8\"\n"),
            "test.toml:2:15: store.crc_threads: expected an integer, got \"8\"");
  EXPECT_EQ(ErrorOf("[store]\nprefault = 1\n"),
            "test.toml:2:12: store.prefault: expected true or false, got 1");
  EXPECT_EQ(ErrorOf("[store]\ncrc_threads = 1.0\n"),
            "test.toml:2:15: store.crc_threads: expected an integer, got 1.0");
  EXPECT_EQ(ErrorOf("[peer]\nmembers = [\"a\", 2]\n"),
            "test.toml:2:11: peer.members: expected a list of strings such as [\"a\", \"b\"], got "
            "[\"a\", 2]");
  EXPECT_EQ(ErrorOf("[peer]\nmembers = \"a,b\"\n"),
            "test.toml:2:11: peer.members: expected a list of strings such as [\"a\", \"b\"], got "
            "\"a,b\"");
  EXPECT_EQ(ErrorOf("name = 1979-05-27\n"), "test.toml:1:8: name: expected a string, got a date");
  EXPECT_EQ(ErrorOf("[store.crc_threads]\n"),
            "test.toml:1:1: store.crc_threads: expected an integer, got a table");
}

TEST(LoadConfigErrorTest, BadByteSizesSayWhy) {
  EXPECT_EQ(ErrorOf("[store]\ncapacity_bytes = -1\n"),
            "test.toml:2:18: store.capacity_bytes: expected a byte size such as 68719476736 or "
            "\"64GiB\", got -1 (a size cannot be negative)");
  EXPECT_EQ(ErrorOf("[store]\ncapacity_bytes = \"64 gigs\"\n"),
            "test.toml:2:18: store.capacity_bytes: expected a byte size such as 68719476736 or "
            "\"64GiB\", got \"64 gigs\" (unknown unit \"gigs\"; the units are B, KB, MB, GB, TB, "
            "PB, KiB, MiB, GiB, TiB, PiB)");
  EXPECT_EQ(ErrorOf("[store]\ncapacity_bytes = 1.5e12\n"),
            "test.toml:2:18: store.capacity_bytes: expected a byte size such as 68719476736 or "
            "\"64GiB\", got 1.5e+12");
  EXPECT_EQ(ErrorOf("", {"store.capacity_bytes=-1KiB"}),
            "override \"store.capacity_bytes=-1KiB\": store.capacity_bytes: expected a byte size "
            "such as 68719476736 or \"64GiB\", got \"-1KiB\" (a size cannot be negative)");
  EXPECT_EQ(ErrorOf("", {"store.capacity_bytes=true"}),
            "override \"store.capacity_bytes=true\": store.capacity_bytes: expected a byte size "
            "such as 68719476736 or \"64GiB\", got true");
}

TEST(LoadConfigErrorTest, ValidatorFailuresSayWhatIsValid) {
  EXPECT_EQ(ErrorOf("[store]\ncrc_threads = 0\n"),
            "test.toml:2:15: store.crc_threads: must be 1 to 64, got 0");
  EXPECT_EQ(ErrorOf("", {"store.crc_threads=65"}),
            "override \"store.crc_threads=65\": store.crc_threads: must be 1 to 64, got 65");
  EXPECT_EQ(ErrorOf("[peer]\nbackoff_factor = 0.5\n"),
            "test.toml:2:18: peer.backoff_factor: must be 1.0 to 10.0, got 0.5");
  EXPECT_EQ(ErrorOf("", {"log.level=verbose"}),
            "override \"log.level=verbose\": log.level: must be one of debug, info, warn; got "
            "\"verbose\"");
}

TEST(LoadConfigErrorTest, UnknownKeysSuggestTheClosest) {
  EXPECT_EQ(ErrorOf("[store]\ncapacity = 5\n"),
            "test.toml:2:1: unknown key \"store.capacity\" (did you mean "
            "\"store.capacity_bytes\"?)");
  EXPECT_EQ(ErrorOf("[stor]\ncrc_thread = 5\n"),
            "test.toml:2:1: unknown key \"stor.crc_thread\" (did you mean "
            "\"store.crc_threads\"?)");
  EXPECT_EQ(ErrorOf("capacity_bytes = 5\n"),
            "test.toml:1:1: unknown key \"capacity_bytes\" (did you mean "
            "\"store.capacity_bytes\"?)");
  EXPECT_EQ(ErrorOf("[network]\nport = 5\n"), "test.toml:2:1: unknown key \"network.port\"");
  EXPECT_EQ(ErrorOf("[network]\n"), "test.toml:1:2: unknown key \"network\"");
  EXPECT_EQ(ErrorOf("\"store.crc_threads\" = 5\n"),
            "test.toml:1:1: unknown key \"store.crc_threads\" (did you mean "
            "\"store.crc_threads\"?)");
  EXPECT_EQ(ErrorOf("", {"log.levle=info"}),
            "override \"log.levle=info\": unknown key \"log.levle\" (did you mean "
            "\"log.level\"?)");
  EXPECT_EQ(ErrorOf("", {"zzz=1"}), "override \"zzz=1\": unknown key \"zzz\"");
}

TEST(LoadConfigErrorTest, TableGivenAsValue) {
  EXPECT_EQ(ErrorOf("store = 5\n"),
            "test.toml:1:9: store: expected a table of keys such as \"store.capacity_bytes\", "
            "got 5");
}

TEST(LoadConfigErrorTest, MalformedOverrides) {
  EXPECT_EQ(ErrorOf("", {"store.crc_threads"}),
            "override \"store.crc_threads\": expected key=value, such as name=tessera");
  EXPECT_EQ(ErrorOf("", {"=5"}), "override \"=5\": expected key=value, such as name=tessera");
  EXPECT_EQ(ErrorOf("", {"store.crc_threads=abc"}),
            "override \"store.crc_threads=abc\": store.crc_threads: expected an integer, got abc");
  EXPECT_EQ(ErrorOf("", {"store.crc_threads="}),
            "override \"store.crc_threads=\": store.crc_threads: expected an integer, got an "
            "empty value");
  EXPECT_EQ(ErrorOf("", {"store.crc_threads=1\nname = 2"}),
            "override \"store.crc_threads=1\nname = 2\": store.crc_threads: expected an integer, "
            "got 1\nname = 2");
  EXPECT_EQ(ErrorOf("", {"store.prefault=yes"}),
            "override \"store.prefault=yes\": store.prefault: expected true or false, got yes");
  EXPECT_EQ(ErrorOf("", {"name=\"unterminated"}),
            "override \"name=\"unterminated\": name: expected a string, got \"unterminated (a "
            "quoted value must be a valid TOML string)");
  EXPECT_EQ(ErrorOf("", {"peer.members=a,,b"}),
            "override \"peer.members=a,,b\": peer.members: expected a list of strings such as "
            "[\"a\", \"b\"], got a,,b (an empty item in a comma-separated list)");
  EXPECT_EQ(ErrorOf("", {"peer.members=[1, 2]"}),
            "override \"peer.members=[1, 2]\": peer.members: expected a list of strings such as "
            "[\"a\", \"b\"], got [1, 2]");
}

TEST(LoadConfigErrorTest, SyntaxErrorHasLineAndColumn) {
  std::string message = ErrorOf("[store]\ncrc_threads = 4\nprefault = \n");
  EXPECT_THAT(message, StartsWith("test.toml:3:"));
  EXPECT_THAT(message, HasSubstr(": TOML syntax error: "));
  message = ErrorOf("[store]\ncrc_threads = 4\ncrc_threads = 5\n");
  EXPECT_THAT(message, StartsWith("test.toml:3:15: TOML syntax error: "));
  EXPECT_THAT(message, HasSubstr("redefine"));
}

TEST(LoadConfigErrorTest, ReportsEveryProblemInFileOrderThenOverrides) {
  std::string message = ErrorOf("[store]\nprefault = 3\ncrc_threads = 99\n[typo]\nx = 1\n",
                                {"nope=1", "store.crc_threads"});
  std::vector<std::string> lines = absl::StrSplit(message, '\n');
  ASSERT_EQ(lines.size(), 5u) << message;
  EXPECT_THAT(lines[0], StartsWith("test.toml:2:12: store.prefault:"));
  EXPECT_THAT(lines[1], StartsWith("test.toml:3:15: store.crc_threads:"));
  EXPECT_THAT(lines[2], StartsWith("test.toml:5:1: unknown key \"typo.x\""));
  EXPECT_THAT(lines[3], StartsWith("override \"nope=1\""));
  EXPECT_THAT(lines[4], StartsWith("override \"store.crc_threads\""));
}

std::string WriteTempFile(const std::string& name, const std::string& contents) {
  const char* dir = std::getenv("TEST_TMPDIR");
  std::string path = std::string(dir != nullptr ? dir : "/tmp") + "/" + name;
  std::FILE* file = std::fopen(path.c_str(), "wb");
  EXPECT_NE(file, nullptr) << path;
  std::fwrite(contents.data(), 1, contents.size(), file);
  std::fclose(file);
  return path;
}

TEST(LoadConfigTest, ReadsFileAndNamesItInErrors) {
  std::string path = WriteTempFile("good.toml", "[store]\ncrc_threads = 12\n");
  absl::StatusOr<Config> config = LoadConfig(TestSchema(), path, {"store.prefault=false"});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->GetInt64("store.crc_threads"), 12);
  EXPECT_FALSE(config->GetBool("store.prefault"));

  path = WriteTempFile("bad.toml", "[store]\ncrc_threads = 0\n");
  config = LoadConfig(TestSchema(), path, {});
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(config.status().message(), path + ":2:15: store.crc_threads: must be 1 to 64, got 0");

  config = LoadConfig(TestSchema(), path + ".missing", {});
  EXPECT_EQ(config.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(config.status().message(), HasSubstr(path + ".missing"));

  const char* dir = std::getenv("TEST_TMPDIR");
  config = LoadConfig(TestSchema(), dir != nullptr ? dir : "/tmp", {});
  EXPECT_FALSE(config.ok());
  EXPECT_THAT(config.status().message(), HasSubstr("cannot read config file"));
}

// --- Rendering ----------------------------------------------------------------------------------

TEST(RenderDefaultsTest, ReparsesToTheDefaults) {
  std::string rendered = TestSchema().RenderDefaults();
  absl::StatusOr<Config> config = LoadConfigFromString(TestSchema(), rendered, "defaults", {});
  ASSERT_TRUE(config.ok()) << config.status() << "\n" << rendered;
  ExpectDefaults(*config);
}

TEST(RenderDefaultsTest, GroupsByTableWithDocsBeforeEachKey) {
  std::string rendered = TestSchema().RenderDefaults();
  EXPECT_THAT(rendered, StartsWith("\n# A top-level key, rendered before any table.\n"
                                   "# Type: string\n"
                                   "name = \"tessera\"\n"
                                   "\n[store]\n"));
  EXPECT_THAT(rendered, HasSubstr("\n# Threads used to checksum a sealed payload.\n"
                                  "# Type: integer; valid: 1 to 64\n"
                                  "crc_threads = 4\n"));
  EXPECT_THAT(rendered, HasSubstr("capacity_bytes = \"64GiB\"\n"));
  EXPECT_THAT(rendered, HasSubstr("members = [\"a\", \"b\"]\n"));
  EXPECT_THAT(rendered, HasSubstr("backoff_factor = 1.5\n"));
  EXPECT_THAT(rendered, HasSubstr("# Type: string; valid: one of debug, info, warn\n"));
  // Tables in order of first declaration; the nested table after its parent's keys.
  size_t store = rendered.find("[store]\n");
  size_t peer = rendered.find("[peer]\n");
  size_t log = rendered.find("[log]\n");
  size_t deep = rendered.find("[store.deep]\n");
  EXPECT_LT(store, peer);
  EXPECT_LT(peer, log);
  EXPECT_LT(log, deep);
  EXPECT_NE(deep, std::string::npos);
  for (absl::string_view line : absl::StrSplit(rendered, '\n')) {
    EXPECT_LE(line.size(), 100u) << line;
  }
}

TEST(RenderDefaultsTest, WrapsLongDocsAndEscapesAwkwardValues) {
  std::string long_doc;
  for (int i = 0; i < 60; ++i) long_doc += "word" + std::to_string(i) + " ";
  absl::StatusOr<ConfigSchema> schema = ConfigSchema::Create({
      ConfigKey::String("s", "quote \" backslash \\ tab \t newline \n bell \x07 é", long_doc),
      ConfigKey::StringList("l", {"", "a,b", "]"}, "List."),
      ConfigKey::Double("d.tiny", 1e-300, "Tiny."),
      ConfigKey::Double("d.third", 1.0 / 3, "Third."),
      ConfigKey::Double("d.whole", -2, "Whole."),
      ConfigKey::Double("d.inf", std::numeric_limits<double>::infinity(), "Inf."),
      ConfigKey::Int64("d.min", std::numeric_limits<int64_t>::min(), "Min."),
      ConfigKey::ByteSize("d.odd_bytes", 1536, "Odd."),
      ConfigKey::ByteSize("d.zero_bytes", 0, "Zero."),
  });
  ASSERT_TRUE(schema.ok()) << schema.status();
  std::string rendered = schema->RenderDefaults();
  absl::StatusOr<Config> config = LoadConfigFromString(*schema, rendered, "defaults", {});
  ASSERT_TRUE(config.ok()) << config.status() << "\n" << rendered;
  EXPECT_EQ(config->GetString("s"), "quote \" backslash \\ tab \t newline \n bell \x07 é");
  EXPECT_THAT(config->GetStringList("l"), ElementsAre("", "a,b", "]"));
  EXPECT_EQ(config->GetDouble("d.tiny"), 1e-300);
  EXPECT_EQ(config->GetDouble("d.third"), 1.0 / 3);
  EXPECT_EQ(config->GetDouble("d.whole"), -2.0);
  EXPECT_EQ(config->GetDouble("d.inf"), std::numeric_limits<double>::infinity());
  EXPECT_EQ(config->GetInt64("d.min"), std::numeric_limits<int64_t>::min());
  EXPECT_EQ(config->GetByteSize("d.odd_bytes"), 1536);
  EXPECT_EQ(config->GetByteSize("d.zero_bytes"), 0);
  EXPECT_THAT(rendered, HasSubstr("whole = -2.0\n"));
  EXPECT_THAT(rendered, HasSubstr("odd_bytes = 1536\n"));
  EXPECT_THAT(rendered, HasSubstr("zero_bytes = 0\n"));
  EXPECT_THAT(rendered, HasSubstr("# word0 word1"));
  for (absl::string_view line : absl::StrSplit(rendered, '\n')) {
    EXPECT_LE(line.size(), 100u) << line;
  }
}

TEST(ConfigRenderTest, EffectiveValuesRoundTrip) {
  absl::StatusOr<Config> config =
      Load("[store]\ncrc_threads = 9\n", {"peer.members=q", "store.capacity_bytes=1000"});
  ASSERT_TRUE(config.ok()) << config.status();
  std::string rendered = config->Render();
  EXPECT_THAT(rendered, HasSubstr("crc_threads = 9\n"));
  absl::StatusOr<Config> again = LoadConfigFromString(TestSchema(), rendered, "effective", {});
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->GetInt64("store.crc_threads"), 9);
  EXPECT_THAT(again->GetStringList("peer.members"), ElementsAre("q"));
  EXPECT_EQ(again->GetByteSize("store.capacity_bytes"), 1000);
}

// --- Misuse -------------------------------------------------------------------------------------

TEST(ConfigDeathTest, GetterOfWrongTypeOrUnknownKeyAborts) {
  Config config(TestSchema());
  EXPECT_DEATH(config.GetBool("store.crc_threads"),
               "key \"store.crc_threads\" has type int64, read as bool");
  EXPECT_DEATH(config.GetInt64("store.capacity_bytes"), "has type byte size, read as int64");
  EXPECT_DEATH(config.GetString("no.such"), "no key \"no.such\" in the schema");
}

}  // namespace
}  // namespace tessera
