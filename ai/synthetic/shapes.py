"""Signed-distance primitives in a vertebra's local frame (mm, float32).

Local axes: ``u`` patient left, ``v`` posterior, ``w`` superior (before the vertebra's
rotation). Every primitive reports a local bounding box so that it is evaluated only on
the voxels it can touch. Distances are approximate (exact enough for a cortical shell).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

F32 = np.float32


class Prim:
    """Base class: ``sdf(u, v, w)`` (negative inside) and ``lo``/``hi`` local bounds."""

    lo: np.ndarray
    hi: np.ndarray

    def sdf(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclass
class Capsule(Prim):
    """Segment ``a``-``b`` with radius ``r``."""

    a: tuple[float, float, float]
    b: tuple[float, float, float]
    r: float

    def __post_init__(self) -> None:
        a, b = np.asarray(self.a, float), np.asarray(self.b, float)
        self.lo = np.minimum(a, b) - self.r
        self.hi = np.maximum(a, b) + self.r

    def sdf(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        ax, ay, az = self.a
        dx, dy, dz = (self.b[0] - ax, self.b[1] - ay, self.b[2] - az)
        L2 = dx * dx + dy * dy + dz * dz
        pu, pv, pw = u - F32(ax), v - F32(ay), w - F32(az)
        t = (pu * F32(dx) + pv * F32(dy) + pw * F32(dz)) * F32(1.0 / L2)
        np.clip(t, 0, 1, out=t)
        pu -= t * F32(dx)
        pv -= t * F32(dy)
        pw -= t * F32(dz)
        d = np.sqrt(pu * pu + pv * pv + pw * pw)
        d -= F32(self.r)
        return d


@dataclass
class Slab(Prim):
    """A 2D capsule (segment ``a``-``b`` in the u-v plane, radius ``r``) extruded over ``w0..w1``.

    ``tilt`` lowers the slab by ``tilt`` mm per mm along ``v`` from ``a`` (processes that
    slope down posteriorly).
    """

    a: tuple[float, float]
    b: tuple[float, float]
    r: float
    w0: float
    w1: float
    tilt: float = 0.0

    def __post_init__(self) -> None:
        vmin = min(self.a[1], self.b[1]) - self.r
        vmax = max(self.a[1], self.b[1]) + self.r
        v0 = self.a[1]
        drop = (-self.tilt * (vmax - v0), -self.tilt * (vmin - v0))
        self.lo = np.array([min(self.a[0], self.b[0]) - self.r, vmin, self.w0 + min(drop)], float)
        self.hi = np.array([max(self.a[0], self.b[0]) + self.r, vmax, self.w1 + max(drop)], float)

    def sdf(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        ax, ay = self.a
        dx, dy = self.b[0] - ax, self.b[1] - ay
        L2 = dx * dx + dy * dy
        pu, pv = u - F32(ax), v - F32(ay)
        t = (pu * F32(dx) + pv * F32(dy)) * F32(1.0 / L2)
        np.clip(t, 0, 1, out=t)
        pu -= t * F32(dx)
        pv -= t * F32(dy)
        d = np.sqrt(pu * pu + pv * pv)
        d -= F32(self.r)
        ww = w + (v - F32(self.a[1])) * F32(self.tilt) if self.tilt else w
        mid, half = (self.w0 + self.w1) / 2, (self.w1 - self.w0) / 2
        dz = np.abs(ww - F32(mid))
        dz -= F32(half)
        return np.maximum(d, dz, out=d)


@dataclass
class EllCyl(Prim):
    """Elliptic cylinder: centre ``(cu, cv)``, half-axes ``(au, av)``, heights ``w0..w1``.

    ``concave`` dents the top and bottom by that many mm at the centre (endplates);
    ``wedge`` lowers the top by ``wedge`` mm at the anterior edge, falling linearly to 0
    at the posterior edge (compression fracture). ``power`` > 2 makes the cross-section a
    superellipse (the boxier outline of a vertebral body).
    """

    cu: float
    cv: float
    au: float
    av: float
    w0: float
    w1: float
    concave: float = 0.0
    wedge: float = 0.0
    power: float = 2.0

    def _q(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Squared normalised radius (superellipse-aware): 1 on the outline."""
        qu = np.abs(u - F32(self.cu)) * F32(1 / self.au)
        qv = np.abs(v - F32(self.cv)) * F32(1 / self.av)
        if self.power == 2.0:
            return qu * qu + qv * qv
        p = F32(self.power)
        r = np.power(np.power(qu, p) + np.power(qv, p), F32(1.0) / p)
        return r * r

    def __post_init__(self) -> None:
        self.lo = np.array([self.cu - self.au, self.cv - self.av, self.w0], float)
        self.hi = np.array([self.cu + self.au, self.cv + self.av, self.w1], float)

    def top(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Height of the top surface at (u, v)."""
        q = np.minimum(self._q(u, v), 1)
        top = F32(self.w1) - F32(self.concave) * (1 - q)
        if self.wedge:
            frac = np.clip((F32(self.cv + self.av) - v) * F32(0.5 / self.av), 0, 1)
            top -= F32(self.wedge) * frac
        return top

    def sdf(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        q = self._q(u, v)
        d = np.sqrt(q)
        d -= 1
        d *= F32(min(self.au, self.av))
        np.minimum(q, 1, out=q)
        q = 1 - q
        dent = q * F32(self.concave) if self.concave else F32(0)
        top = F32(self.w1) - dent
        if self.wedge:
            frac = np.clip((F32(self.cv + self.av) - v) * F32(0.5 / self.av), 0, 1)
            top = top - F32(self.wedge) * frac
        bot = F32(self.w0) + dent
        np.maximum(d, w - top, out=d)
        np.maximum(d, bot - w, out=d)
        return d


@dataclass
class Ellipsoid(Prim):
    """Ellipsoid centred at ``c`` with half-axes ``r``."""

    c: tuple[float, float, float]
    r: tuple[float, float, float]

    def __post_init__(self) -> None:
        self.lo = np.asarray(self.c, float) - np.asarray(self.r, float)
        self.hi = np.asarray(self.c, float) + np.asarray(self.r, float)

    def sdf(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        qu = (u - F32(self.c[0])) * F32(1 / self.r[0])
        qv = (v - F32(self.c[1])) * F32(1 / self.r[1])
        qw = (w - F32(self.c[2])) * F32(1 / self.r[2])
        d = np.sqrt(qu * qu + qv * qv + qw * qw)
        d -= 1
        d *= F32(min(self.r))
        return d
