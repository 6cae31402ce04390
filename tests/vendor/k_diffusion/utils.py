# From the `k-diffusion` package (PyPI 0.1.1.post1), k_diffusion/utils.py: the one function sampling.py uses,
# verbatim (the rest of that module imports torchvision). MIT License, (c) 2022 Katherine Crowson.


def append_dims(x, target_dims):
    """Appends dimensions to the end of a tensor until it has target_dims dimensions."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f'input has {x.ndim} dims but target_dims is {target_dims}, which is less')
    return x[(...,) + (None,) * dims_to_append]
