"""Transfer learning and evaluation that produce model bundles (`cxr train`, `cxr evaluate`)."""
