"""`tenantgate config-schema`: print the JSON Schema of the config file."""

import json


def register(sub):
    p = sub.add_parser("config-schema", help="print the JSON Schema of the YAML config")
    p.set_defaults(func=run)


def run(args) -> int:
    from proxy.config import Config

    print(json.dumps(Config.model_json_schema(by_alias=True), indent=2))
    return 0
