// Public test data (RFC JOSE vectors, FHIR R4 and DS4P examples) lives outside the repository,
// in ../shared/testdata beside the checkout; EHRGATE_TESTDATA overrides it. Tests that need it
// skip with a message when it is absent, so a plain clone's suite still passes.
#pragma once

#include <cstdlib>
#include <filesystem>

namespace ehrgate::testing {

inline std::filesystem::path testdata_dir() {
    if (const char *env = std::getenv("EHRGATE_TESTDATA")) {
        return env;
    }
    return std::filesystem::path(EHRGATE_SOURCE_DIR).parent_path() / "shared" / "testdata";
}

}  // namespace ehrgate::testing
