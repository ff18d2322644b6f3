"""The UDAT / UDAT-AS training application: data sets, the modified VGG16, the trainer, the
experiment runner and its reports.

It is built on the kernel library (the package `udat_kernels` above it) and imports it; the
library never imports this subpackage, so `import udat_kernels` does not load the application's
dependencies (Pillow, tqdm, matplotlib, scikit-learn, mlxtend). Command lines: `udat-train`
(`udat_kernels.udat.training.cli`) and `udat-experiment` (`udat_kernels.udat.experiment`).
"""
