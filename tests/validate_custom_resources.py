"""Validates custom resources against the CRDs' schemas, as the API server would.

usage: validate_custom_resources.py CRDS.yaml FILE...

Every object in FILE... whose kind a CRD in CRDS.yaml defines is checked against that CRD's
openAPIV3Schema, read as the API server reads it: `nullable` admits null, and a field the
schema does not name is an error (kubectl's strict field validation; the server would
otherwise drop it silently). Other objects are skipped. Prints one line per error; exits 1
if there are any.
"""

import sys

import jsonschema
import yaml


def as_json_schema(schema):
    if isinstance(schema, list):
        return [as_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: as_json_schema(v) for k, v in schema.items()}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def main():
    schemas = {}
    with open(sys.argv[1]) as crds:
        for crd in yaml.safe_load_all(crds):
            if not crd:
                continue
            for version in crd["spec"]["versions"]:
                key = (f'{crd["spec"]["group"]}/{version["name"]}', crd["spec"]["names"]["kind"])
                schema = dict(version["schema"]["openAPIV3Schema"])
                # The server adds these to every custom resource's schema itself.
                schema["properties"] = {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                    **schema.get("properties", {}),
                }
                schemas[key] = as_json_schema(schema)
    errors, checked = [], 0
    for path in sys.argv[2:]:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not doc or (doc.get("apiVersion"), doc.get("kind")) not in schemas:
                    continue
                checked += 1
                name = doc.get("metadata", {}).get("name", "?")
                validator = jsonschema.Draft7Validator(schemas[(doc["apiVersion"], doc["kind"])])
                for error in validator.iter_errors(doc):
                    where = ".".join(str(p) for p in error.absolute_path) or "(object)"
                    errors.append(f'{path}: {doc["kind"]} {name}: {where}: {error.message}')
    print("\n".join(errors))
    print(f"checked {checked} custom resources, {len(errors)} errors", file=sys.stderr)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
