#include "ehrgate/resource_compartment.hpp"

#include <string>
#include <vector>

#include "ehrgate/compartment.hpp"

namespace ehrgate::compartment {

namespace {

bool is_patient_reference(std::string_view reference, std::string_view patient_id,
                          std::string_view server_base) {
    if (!server_base.empty() && reference.starts_with(server_base) &&
        reference.substr(server_base.size()).starts_with("/")) {
        reference.remove_prefix(server_base.size() + 1);
    }
    if (!reference.starts_with("Patient/")) {
        return false;
    }
    reference.remove_prefix(8);
    // Patient/P or a versioned Patient/P/_history/N: the same patient either way.
    const size_t slash = reference.find('/');
    if (slash != std::string_view::npos) {
        if (!reference.substr(slash).starts_with("/_history/")) {
            return false;
        }
        reference = reference.substr(0, slash);
    }
    return reference == patient_id;
}

// Collects the values at a dotted path, descending into arrays at every step.
void collect(const json::Value &node, std::string_view path,
             std::vector<const json::Value *> &out) {
    if (const json::Value::Array *array = node.as_array()) {
        for (const json::Value &element : *array) {
            collect(element, path, out);
        }
        return;
    }
    if (path.empty()) {
        out.push_back(&node);
        return;
    }
    const size_t dot = path.find('.');
    const json::Value *child = node.find(path.substr(0, dot));
    if (child != nullptr) {
        collect(*child, dot == std::string_view::npos ? std::string_view() : path.substr(dot + 1),
                out);
    }
}

bool single_resource_in_compartment(const json::Value &resource, std::string_view patient_id,
                                    std::string_view server_base) {
    const json::Value *type_value = resource.find("resourceType");
    const std::string *type = type_value != nullptr ? type_value->as_string() : nullptr;
    if (type == nullptr) {
        return false;
    }
    if (*type == "Patient") {
        const json::Value *id = resource.find("id");
        return id != nullptr && id->as_string() != nullptr && *id->as_string() == patient_id;
    }
    if (is_shared_reference_type(*type)) {
        return true;
    }
    std::vector<const json::Value *> references;
    for (const std::string_view path : reference_paths(*type)) {
        references.clear();
        collect(resource, path, references);
        for (const json::Value *reference : references) {
            const json::Value *target = reference->find("reference");
            if (target != nullptr && target->as_string() != nullptr &&
                is_patient_reference(*target->as_string(), patient_id, server_base)) {
                return true;
            }
        }
    }
    return false;
}

}  // namespace

bool resource_in_patient_compartment(const json::Value &resource, std::string_view patient_id,
                                     std::string_view server_base) {
    if (patient_id.empty() || !resource.is_object()) {
        return false;
    }
    const json::Value *type = resource.find("resourceType");
    if (type != nullptr && type->as_string() != nullptr && *type->as_string() == "Bundle") {
        const json::Value *entries = resource.find("entry");
        if (entries == nullptr) {
            return true;  // an empty history
        }
        const json::Value::Array *list = entries->as_array();
        if (list == nullptr) {
            return false;
        }
        for (const json::Value &entry : *list) {
            const json::Value *inner = entry.find("resource");
            if (inner != nullptr &&
                !single_resource_in_compartment(*inner, patient_id, server_base)) {
                return false;
            }
        }
        return true;
    }
    return single_resource_in_compartment(resource, patient_id, server_base);
}

}  // namespace ehrgate::compartment
