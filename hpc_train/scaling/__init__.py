"""Scaling studies (`hpc-train scale`) and the alpha-beta-gamma cost model that predicts beyond them."""
