// Response-side half of the patient compartment: is this returned resource the patient's?
// Used when a patient-context token reads a resource by id, where only the body tells whose it is.
#pragma once

#include <string_view>

#include "ehrgate/json.hpp"

namespace ehrgate::compartment {

// True when `resource` belongs to patient `patient_id`'s compartment: the Patient itself, a
// resource referencing Patient/<id> (relative, or absolute below `server_base`) at one of the
// compartment's reference paths for its type, shared reference data (Practitioner, Medication,
// ...), or a history Bundle every entry of which qualifies. Anything else, including anything
// malformed, is false.
bool resource_in_patient_compartment(const json::Value &resource, std::string_view patient_id,
                                     std::string_view server_base);

}  // namespace ehrgate::compartment
