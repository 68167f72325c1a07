"""Consumers of `cxr.results` that speak the hospital's standards: FHIR R4 bundles and DICOM Structured Reports.

Each exporter is a pure builder (`fhir`, `sr`) between thin edges: the results topic read by `runner` with a
cursor under `CXR_STATE_DIR` (`cursor`), and the places the exports go (`sinks`: the contract; `fhir_server`,
`stow`, `cstore`, `folder`, over the bounded HTTP of `http`). `service` wires them for `cxr export`.
"""
