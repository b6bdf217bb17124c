#!/usr/bin/env python3
"""Renders charts/envctl with real Helm (helm-python-sdk) and prints the manifests as one
YAML stream. Used by the Rust cluster test that runs envctl as the chart's ServiceAccount.

Usage: render.py RELEASE NAMESPACE [KEY=VALUE ...]   (values as `helm --set`)
"""
import os
import sys

import helm_python as helm

CHART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "charts", "envctl")


def main():
    release, namespace, *sets = sys.argv[1:]
    values = {}
    for s in sets:
        merged = helm.parse_set_string(s) if hasattr(helm, "parse_set_string") else None
        values = _merge(values, merged)
    chart = helm.Chart.load(CHART)
    rendered = chart.render(values, name=release, namespace=namespace, is_install=True)
    for path in sorted(rendered):
        text = rendered[path].strip()
        if text and not path.endswith("NOTES.txt"):
            print("---")
            print(text)


def _merge(a, b):
    out = dict(a)
    for k, v in (b or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


if __name__ == "__main__":
    main()
