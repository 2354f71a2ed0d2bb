"""hpc_train.io: parallel HDF5 (h5py on MPI-IO) and the fio-compatible I/O benchmark.

hdf5.py lays out and writes datasets in parallel and checks them, convert.py turns other
formats into them (the loader that reads them is `hpc_train.data.HDF5Loader`); fiojob.py,
engines.py, iostats.py and iobench.py are `hpc-train iobench`. This module itself
reports what the h5py installation can do.
"""

from __future__ import annotations


def h5py_status() -> dict:
    """h5py's version and whether it was built against parallel HDF5 (driver='mpio')."""
    try:
        import h5py
    except ImportError as exc:
        return {"h5py": None, "hdf5": None, "parallel": False, "error": str(exc)}
    return {
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "parallel": bool(h5py.get_config().mpi),
    }
