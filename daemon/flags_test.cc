#include "daemon/flags.h"

#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

using ::testing::ElementsAre;
using ::testing::EndsWith;
using ::testing::HasSubstr;
using Action = TesseradFlags::Action;

constexpr char kValidFlags[] =
    "; valid flags: --config PATH, --set KEY=VALUE, --print-default-config, --help, --version";

std::string ErrorOf(const std::vector<std::string>& args) {
  absl::StatusOr<TesseradFlags> flags = ParseTesseradFlags(args);
  if (flags.ok()) return "(parsed)";
  EXPECT_EQ(flags.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(flags.status().message());
}

TEST(TesseradFlagsTest, NoArgumentsRunsWithDefaults) {
  absl::StatusOr<TesseradFlags> flags = ParseTesseradFlags({});
  ASSERT_TRUE(flags.ok()) << flags.status();
  EXPECT_EQ(flags->action, Action::kRun);
  EXPECT_EQ(flags->config_path, "");
  EXPECT_TRUE(flags->overrides.empty());
}

TEST(TesseradFlagsTest, ConfigAndRepeatedSetInBothForms) {
  absl::StatusOr<TesseradFlags> flags =
      ParseTesseradFlags({"--set", "store.crc_threads=8", "--config", "/etc/tessera/tesserad.toml",
                          "--set=log.level=debug", "--set", "node.id=a=b", "--set=k= v "});
  ASSERT_TRUE(flags.ok()) << flags.status();
  EXPECT_EQ(flags->action, Action::kRun);
  EXPECT_EQ(flags->config_path, "/etc/tessera/tesserad.toml");
  EXPECT_THAT(flags->overrides,
              ElementsAre("store.crc_threads=8", "log.level=debug", "node.id=a=b", "k= v "));

  flags = ParseTesseradFlags({"--config=relative.toml"});
  ASSERT_TRUE(flags.ok()) << flags.status();
  EXPECT_EQ(flags->config_path, "relative.toml");
}

TEST(TesseradFlagsTest, Actions) {
  EXPECT_EQ(ParseTesseradFlags({"--print-default-config"})->action, Action::kPrintDefaultConfig);
  EXPECT_EQ(ParseTesseradFlags({"--help"})->action, Action::kHelp);
  EXPECT_EQ(ParseTesseradFlags({"-h"})->action, Action::kHelp);
  EXPECT_EQ(ParseTesseradFlags({"--version"})->action, Action::kVersion);
  // --help and --version win over everything else; help over version.
  EXPECT_EQ(ParseTesseradFlags({"--config", "x", "--set", "a=b", "--help"})->action, Action::kHelp);
  EXPECT_EQ(ParseTesseradFlags({"--version", "--help"})->action, Action::kHelp);
  EXPECT_EQ(ParseTesseradFlags({"--print-default-config", "--version"})->action, Action::kVersion);
}

TEST(TesseradFlagsTest, UnknownFlagsAndArgumentsListTheValidFlags) {
  EXPECT_EQ(ErrorOf({"--confg", "x"}), std::string("unknown flag \"--confg\"") + kValidFlags);
  EXPECT_EQ(ErrorOf({"--verbose=1"}), std::string("unknown flag \"--verbose\"") + kValidFlags);
  EXPECT_EQ(ErrorOf({"-c"}), std::string("unknown flag \"-c\"") + kValidFlags);
  EXPECT_EQ(ErrorOf({"--"}), std::string("unknown flag \"--\"") + kValidFlags);
  EXPECT_EQ(ErrorOf({"tesserad.toml"}),
            std::string("unexpected argument \"tesserad.toml\": tesserad takes only flags") +
                kValidFlags);
  EXPECT_EQ(ErrorOf({"-"}),
            std::string("unexpected argument \"-\": tesserad takes only flags") + kValidFlags);
  // An unknown flag is an error even beside --help.
  EXPECT_THAT(ErrorOf({"--help", "--nope"}), HasSubstr("unknown flag \"--nope\""));
}

TEST(TesseradFlagsTest, MissingOrEmptyValues) {
  EXPECT_EQ(ErrorOf({"--config"}),
            std::string("--config needs a value: --config PATH") + kValidFlags);
  EXPECT_EQ(ErrorOf({"--set"}), std::string("--set needs a value: --set KEY=VALUE") + kValidFlags);
  EXPECT_EQ(ErrorOf({"--config", "--set", "a=b"}),
            std::string("--config needs a value: --config PATH") + kValidFlags);
  EXPECT_EQ(ErrorOf({"--config="}),
            std::string("--config needs a non-empty value: --config PATH") + kValidFlags);
  EXPECT_EQ(ErrorOf({"--set", ""}),
            std::string("--set needs a non-empty value: --set KEY=VALUE") + kValidFlags);
}

TEST(TesseradFlagsTest, MalformedValues) {
  EXPECT_EQ(ErrorOf({"--set", "store.crc_threads"}),
            std::string("--set needs KEY=VALUE, such as --set log.level=debug; got "
                        "\"store.crc_threads\"") +
                kValidFlags);
  EXPECT_EQ(ErrorOf({"--set==5"}),
            std::string("--set needs KEY=VALUE, such as --set log.level=debug; got \"=5\"") +
                kValidFlags);
  EXPECT_EQ(ErrorOf({"--help=yes"}),
            std::string("--help takes no value, got \"--help=yes\"") + kValidFlags);
  EXPECT_EQ(ErrorOf({"--print-default-config=1"}),
            std::string("--print-default-config takes no value, got "
                        "\"--print-default-config=1\"") +
                kValidFlags);
  EXPECT_EQ(ErrorOf({"--config", "a.toml", "--config=b.toml"}),
            std::string("--config given twice (\"a.toml\" and \"b.toml\"); a daemon reads one "
                        "file") +
                kValidFlags);
}

TEST(TesseradFlagsTest, PrintDefaultConfigTakesNoConfigOrSet) {
  std::string expected =
      std::string(
          "--print-default-config prints the built-in defaults and takes no --config "
          "or --set") +
      kValidFlags;
  EXPECT_EQ(ErrorOf({"--print-default-config", "--config", "x.toml"}), expected);
  EXPECT_EQ(ErrorOf({"--set", "a=b", "--print-default-config"}), expected);
}

TEST(TesseradFlagsTest, UsageMentionsEveryFlagWithinEightyColumns) {
  std::string usage = TesseradUsage();
  for (const char* flag :
       {"--config PATH", "--set KEY=VALUE", "--print-default-config", "--help", "--version"}) {
    EXPECT_THAT(usage, HasSubstr(flag));
  }
  EXPECT_THAT(usage, EndsWith("\n"));
  for (absl::string_view line : absl::StrSplit(usage, '\n')) EXPECT_LE(line.size(), 80u) << line;
}

}  // namespace
}  // namespace tessera
