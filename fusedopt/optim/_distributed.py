"""The fused optimizers on torch.distributed: DTensor params and the cross-rank norm.

DTensor params (FSDP2 ``fully_shard``, tensor parallelism).  The kernels step each rank's
local shard: `local` unwraps a param, gradient or state to the plain tensor it holds, and
the plan hands those to the backends.  States are DTensors with the param's placements
(``torch.zeros_like`` of a DTensor param), so ``optimizer.state``, ``state_dict()`` and
``torch.distributed.checkpoint`` see what they see with torch's optimizers.

The norm group.  The global gradient norm and the inf/NaN flag are summed over one process
group with one all-reduce of a small device tensor per step (`all_reduce_sum`, a c10d
functional collective: no host sync).  `resolve` chooses the group: the ``process_group``
the user passed, else the group of the DTensor params' device mesh, else none (every rank
on its own, as for DDP, whose gradients are the same on every rank).  Each element is
counted once over the group (`NormGroup.counted`): a DTensor param counts on the ranks
whose coordinate is 0 on every mesh dim where it is replicated, and only in the copy of its
mesh that holds the lowest rank of the meshes' ranks; a plain param counts on every rank
when ``process_group`` was given (each rank's plain params are its own part of the model:
ZeRO, hand-sharded params), and on the lowest rank only when the group comes from the
DTensor params (then a plain param is a replica, e.g. a module tensor parallelism left
alone).
"""

from __future__ import annotations

import sys

import torch

_GROUPS: dict[tuple, object] = {}  # flattened groups of N-d meshes, by their ranks


def dtensor_type():
    """The DTensor class, or None when no DTensor can exist (never imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else getattr(module, "DTensor", None)


def is_dtensor(t) -> bool:
    cls = dtensor_type()
    return cls is not None and type(t) is cls


def local(t):
    """The plain tensor a DTensor holds on this rank; any other object unchanged."""
    cls = dtensor_type()
    return t._local_tensor if cls is not None and type(t) is cls else t


def localize(lst):
    """A list with every DTensor replaced by its local tensor (None unchanged)."""
    if lst is None:
        return None
    cls = dtensor_type()
    return [t._local_tensor if type(t) is cls else t for t in lst]


def describe_spec(t) -> str:
    return f"mesh {t.device_mesh}, placements {tuple(t.placements)}"


def same_spec(a, b) -> bool:
    """Same device mesh and placements (the global shapes are compared by the caller)."""
    return (a.placements == b.placements
            and (a.device_mesh is b.device_mesh or a.device_mesh == b.device_mesh))


def check_param_placements(p, what: str) -> None:
    for placement in p.placements:
        if placement.is_partial():
            raise ValueError(f"{what} is a DTensor with a Partial placement "
                             f"({tuple(p.placements)}): an optimizer steps params whose "
                             f"values are sharded or replicated")


def like_param(p, local_tensor):
    """A DTensor with ``p``'s mesh, placements and global shape around ``local_tensor``."""
    cls = dtensor_type()
    return cls.from_local(local_tensor, p.device_mesh, p.placements, run_check=False,
                          shape=p.shape, stride=p.stride())


def shard_of(value, p, what: str):
    """This rank's part of a checkpoint value for a DTensor param ``p``, as a plain tensor
    on the param's local layout (fp32): a DTensor with the param's mesh (redistributed to
    its placements when they differ -- a collective), or a plain tensor holding the full
    value (sliced locally, no communication)."""
    from torch.distributed.tensor import distribute_tensor

    if value.shape != p.shape:
        raise ValueError(f"{what} has shape {tuple(value.shape)}, expected {tuple(p.shape)} "
                         f"(the param's shape)")
    if is_dtensor(value):
        if not (value.device_mesh is p.device_mesh or value.device_mesh == p.device_mesh):
            raise ValueError(f"{what} is a DTensor on {value.device_mesh}, but its param lives "
                             f"on {p.device_mesh}")
        if value.placements != p.placements:
            value = value.redistribute(p.device_mesh, p.placements)
        part = value._local_tensor
    else:
        part = distribute_tensor(value.detach().to(p.device), p.device_mesh, p.placements,
                                 src_data_rank=None)._local_tensor
    out = torch.empty_like(p._local_tensor, dtype=torch.float32)
    out.copy_(part)
    return out


def check_grad(g, p, where: str) -> bool:
    """The DTensor gradient of DTensor param ``p``; True when it needs a copy for the step
    (placements other than the param's: redistributed; or local strides not the param's)."""
    from fusedopt.backends import _optim_boundary as boundary

    if not is_dtensor(g):
        raise TypeError(f"the gradient of {where} is a {type(g).__name__}, but the param is a "
                        f"DTensor: expected a DTensor gradient")
    if not (g.device_mesh is p.device_mesh or g.device_mesh == p.device_mesh):
        raise ValueError(f"the gradient of {where} lives on {g.device_mesh}, its param on "
                         f"{p.device_mesh}")
    boundary.local_tensor(g, f"the gradient of {where}")
    if g.placements != p.placements:
        return True
    return not boundary.same_layout(g._local_tensor, p._local_tensor)


def check_state(value, what: str, p):
    """A state tensor of DTensor param ``p`` must be a DTensor with its mesh and placements."""
    if not is_dtensor(value):
        raise TypeError(f"{what} is a {type(value).__name__}; the state of a DTensor param must "
                        f"be a DTensor with the param's placements ({describe_spec(p)}), e.g. "
                        f"torch.zeros_like(param, dtype=torch.float32)")
    if not same_spec(value, p) or value.shape != p.shape:
        raise ValueError(f"{what} is a DTensor of shape {tuple(value.shape)} on "
                         f"{describe_spec(value)}, expected the param's shape {tuple(p.shape)} "
                         f"on {describe_spec(p)}")
    return value._local_tensor


class BucketGrads:
    """How a bucket with DTensor params turns its gradients into local tensors at every
    step: the gradients' meshes and placements seen when the plan was built (a change
    rebuilds it), and which of them are redistributed to their param's placements."""

    __slots__ = ("placements", "redistribute", "states")

    def __init__(self, keys, grads):
        self.placements = [g.placements if is_dtensor(g) else None for g in grads]
        self.redistribute = [i for i, (p, g) in enumerate(zip(keys, grads))
                             if is_dtensor(p) and g.placements != p.placements]
        self.states: dict = {}  # the bucket's state lists as optimizer.state holds them

    def local_grads(self, keys, grads, check: bool):
        """The local gradients (with ``check``, None when a gradient's placements changed)."""
        cls = dtensor_type()
        if check and [g.placements if type(g) is cls else None for g in grads] != self.placements:
            return None
        out = [g._local_tensor if type(g) is cls else g for g in grads]
        for i in self.redistribute:
            p = keys[i]
            out[i] = grads[i].redistribute(p.device_mesh, p.placements)._local_tensor
        return out


def mesh_ranks(mesh) -> frozenset:
    return frozenset(mesh.mesh.flatten().tolist())


def _mesh_group(mesh, ranks):
    """One process group over every rank of ``mesh``."""
    import torch.distributed as dist

    if mesh.ndim == 1:
        return mesh.get_group()
    if ranks == frozenset(range(dist.get_world_size())):
        return dist.group.WORLD
    key = tuple(sorted(ranks))
    if key not in _GROUPS:  # only the mesh's ranks take part in creating it
        _GROUPS[key] = dist.new_group(list(key), use_local_synchronization=True)
    return _GROUPS[key]


class NormGroup:
    """The process group of an optimizer's norm and which of its params count in it.

    ``plain_own``: a plain param is this rank's own part of the model (``process_group``
    given), else a replica of one every rank of the group holds (the unparallelized modules
    of a tensor-parallel model), counted on the lowest rank only."""

    __slots__ = ("group", "owner", "plain_own", "_mesh_owned")

    def __init__(self, group, owner, plain_own):
        self.group = group
        self.owner = owner  # the lowest rank of the params' meshes (None: no DTensor param)
        self.plain_own = plain_own
        self._mesh_owned: dict = {}

    def counted(self, p) -> bool:
        """Whether this rank adds ``p``'s squared gradient to the norm."""
        if not is_dtensor(p):
            import torch.distributed as dist

            return self.plain_own or dist.get_rank() == self.owner
        mesh = p.device_mesh
        coordinate = mesh.get_coordinate()
        if coordinate is None:
            return False
        owned = self._mesh_owned.get(id(mesh))
        if owned is None:
            owned = self._mesh_owned[id(mesh)] = (mesh, self.owner in mesh_ranks(mesh))
        if not owned[1]:
            return False
        return all(c == 0 for c, placement in zip(coordinate, p.placements)
                   if placement.is_replicate())


def resolve(params, process_group) -> NormGroup | None:
    """The norm group of an optimizer over ``params`` (see the module docstring)."""
    dparams = [p for p in params if is_dtensor(p)]
    if process_group is None and not dparams:
        return None
    import torch.distributed as dist

    meshes = {id(p.device_mesh): p.device_mesh for p in dparams}
    ranks = {key: mesh_ranks(mesh) for key, mesh in meshes.items()}
    union = frozenset().union(*ranks.values())
    owner = min(union) if union else None
    if process_group is not None:
        if not dist.is_initialized():
            raise ValueError("process_group was given but torch.distributed is not initialized")
        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, "
                            f"got {type(process_group).__name__}")
        members = frozenset(dist.get_process_group_ranks(process_group))
        if dist.get_rank() not in members:
            raise ValueError(f"process_group (ranks {sorted(members)}) does not contain this "
                             f"rank ({dist.get_rank()})")
        if not union <= members:
            raise ValueError(f"process_group (ranks {sorted(members)}) does not contain every "
                             f"rank of the DTensor params' device meshes ({sorted(union)})")
        return NormGroup(process_group, owner, plain_own=True)
    widest = [key for key in meshes if ranks[key] == union]
    if not widest:
        raise ValueError(f"the DTensor params live on device meshes over different ranks "
                         f"({sorted(sorted(r) for r in set(ranks.values()))}) and none covers "
                         f"them all: pass process_group= (the group over which the gradient "
                         f"norm is summed)")
    mesh = meshes[max(widest, key=lambda key: meshes[key].ndim)]
    return NormGroup(_mesh_group(mesh, union), owner, plain_own=False)


def warn_if_partitioned(opt, group) -> None:
    """Warn once when a wrapper that partitions the params over the ranks (ZeRO copies its
    ``max_grad_norm`` default into the groups of the optimizer it builds) drives an
    optimizer that clips without a process group: each rank would clip by its own part's
    norm."""
    if "max_grad_norm" not in group or opt.__dict__.get("_fo_warned_partition"):
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        import warnings

        opt._fo_warned_partition = True
        warnings.warn(f"{type(opt).__name__}(max_grad_norm=...) is stepped by a wrapper that "
                      f"partitions the params over the ranks (a 'max_grad_norm' param-group "
                      f"key, as ZeroRedundancyOptimizer sets), without a process_group: each "
                      f"rank clips by the norm of its own params only. Pass the group, e.g. "
                      f"optimizer_class=functools.partial({type(opt).__name__}, "
                      f"process_group=dist.group.WORLD)", stacklevel=4)


def all_reduce_sum(buffer: torch.Tensor, group) -> None:
    """Sum ``buffer`` over ``group`` in place (a c10d functional collective: traceable, and
    never a host sync)."""
    torch.ops._c10d_functional.all_reduce_(buffer, "sum", group.group_name)
    torch.ops._c10d_functional.wait_tensor(buffer)


def same_group(a, b) -> bool:
    return a is b or (a is not None and b is not None and a.group_name == b.group_name)


def reduce(norm, found, norm_group, flag_group):
    """The step's ``norm`` ([Σ g², inf/NaN flag] or None) and GradScaler / LossScaler.unscale_
    ``found`` flag (0-dim or None), summed over the optimizer's ``norm_group`` in one
    all-reduce, and the inf/NaN flag also over a LossScaler's ``flag_group`` when that is
    another group (a second all-reduce).  Flags come back as 0.0 / 1.0."""
    if norm_group is not None:
        parts = [t for t in (norm, None if found is None else found.reshape(1)) if t is not None]
        buffer = torch.cat(parts)
        all_reduce_sum(buffer, norm_group)
        if norm is not None:
            norm, buffer = buffer[:2], buffer[2:]
            norm[1:].clamp_(max=1.0)
        if found is not None:
            found = buffer.reshape(()).clamp(max=1.0)
    if flag_group is not None and norm is not None and not same_group(flag_group, norm_group):
        flag = norm[1:].clone()
        all_reduce_sum(flag, flag_group)
        norm = torch.cat([norm[:1], flag.clamp(max=1.0)])
    return norm, found
