# What the receiver knows of each node's health, for `citynode receive --status`: when it was
# last heard, what its STATUS frames say (boot count, readings dropped, sensor faults, heap,
# firmware), and what went wrong at the host (readings whose identity was taken). Sans-IO: the
# receiver feeds it, the status file shows it, problems() names the nodes to look at.

import statistics

SILENT_AFTER = 3  # frame periods without a frame before a node is "not heard"
_MIN_PERIOD_S = 60.0


class NodeHealth:
    """One node. `period_s`: how often it sends a DATA frame, estimated from its frames (the
    gap between readings times the readings a frame)."""

    __slots__ = (
        "last_heard",
        "frames",
        "readings",
        "period_s",
        "first_boot",
        "boot_count",
        "reset_cause",
        "readings_dropped",
        "sensor_faults",
        "faults_by_sensor",
        "free_heap",
        "fw_version",
        "journal_fill",
        "index_conflicts",
    )

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, None)
        self.frames = self.readings = self.index_conflicts = 0

    def as_dict(self, now):
        out = {name: getattr(self, name) for name in self.__slots__}
        out["resets"] = 0 if self.boot_count is None else self.boot_count - (self.first_boot or 0)
        del out["first_boot"]
        if self.last_heard is not None:
            out["last_heard_s_ago"] = round(now - self.last_heard, 1)
        return {k: v for k, v in out.items() if v is not None}


# STATUS fields (protocols/uplink.py STATUS_FIELDS) kept per node
_FIELDS = {
    1: "boot_count",
    2: "reset_cause",
    3: "free_heap",
    4: "journal_fill",
    5: "readings_dropped",
    7: "fw_version",
    8: "sensor_faults",
}
# STATUS fields 10-13: faults per sensor type, on nodes with config "sensors" (SPEC.md)
_SENSOR_FIELDS = {10: "bme280", 11: "sds011", 12: "pms5003", 13: "sps30"}


class Health:
    """Every node heard since the receiver started."""

    def __init__(self):
        self.nodes = {}

    def _node(self, node_id):
        node = self.nodes.get(node_id)
        if node is None:
            node = self.nodes[node_id] = NodeHealth()
        return node

    def data(self, frame, rx_time):
        node = self._node(frame.node_id)
        node.last_heard = rx_time
        node.frames += 1
        node.readings += len(frame.readings)
        ages = frame.ages
        if len(ages) > 1:
            gap = statistics.median(ages[i - 1] - ages[i] for i in range(1, len(ages)))
            node.period_s = max(_MIN_PERIOD_S, float(gap) * len(ages))

    def status(self, status, rx_time):
        node = self._node(status.node_id)
        node.last_heard = rx_time
        for fid, name in _FIELDS.items():
            if fid in status.fields:
                setattr(node, name, status.fields[fid])
        kinds = {
            name: status.fields[fid]
            for fid, name in _SENSOR_FIELDS.items()
            if status.fields.get(fid)
        }
        node.faults_by_sensor = kinds or None
        if node.first_boot is None and node.boot_count is not None:
            node.first_boot = node.boot_count

    def conflicts(self, node_id, count):
        self._node(node_id).index_conflicts += count

    def snapshot(self, now, limit=5000):
        """{node_id (str): health} of up to `limit` nodes, the ones with problems first."""
        flagged = {n for n, _ in self.problems(now)}
        order = sorted(self.nodes, key=lambda n: (n not in flagged, n))[:limit]
        return {str(n): self.nodes[n].as_dict(now) for n in order}

    def problems(self, now, silent_after=SILENT_AFTER):
        """[(node_id, what)] for every node that needs a look, in node order."""
        out = []
        for node_id in sorted(self.nodes):
            h = self.nodes[node_id]
            period = h.period_s or _MIN_PERIOD_S
            if h.last_heard is not None and now - h.last_heard > silent_after * period:
                out.append(
                    (
                        node_id,
                        "not heard for %.0f s (it sends about every %.0f s)"
                        % (now - h.last_heard, period),
                    )
                )
            if h.readings_dropped:
                out.append((node_id, "%d readings dropped on the node" % h.readings_dropped))
            if h.sensor_faults:
                which = h.faults_by_sensor or {}
                out.append(
                    (
                        node_id,
                        "%d sensor faults since boot%s"
                        % (
                            h.sensor_faults,
                            " (%s)" % ", ".join("%s %d" % kv for kv in sorted(which.items()))
                            if isinstance(which, dict) and which
                            else "",
                        ),
                    )
                )
            resets = (h.boot_count or 0) - (h.first_boot or 0)
            if resets:
                out.append((node_id, "reset %d times since the receiver started" % resets))
            if h.index_conflicts:
                out.append(
                    (
                        node_id,
                        "%d readings with reading indices already used (count restarted)"
                        % h.index_conflicts,
                    )
                )
        return out


def from_snapshot(doc, now=None):
    """A Health with the nodes of a status file's "node_health": what a restarted receiver
    knew before (a node that went silent during the restart is still named), and what
    `citynode receive --status` judges. Entries that do not parse are skipped."""
    health = Health()
    for key, d in (doc.get("node_health") or {}).items():
        if not str(key).isdigit() or not isinstance(d, dict):
            continue
        try:
            node = health._node(int(key))
            for name in NodeHealth.__slots__:
                if name in d and name != "first_boot":
                    setattr(node, name, d[name])
            node.first_boot = (d.get("boot_count") or 0) - d.get("resets", 0)
            if "last_heard_s_ago" in d:
                node.last_heard = float(doc.get("time", now)) - float(d["last_heard_s_ago"])
        except (TypeError, ValueError):
            health.nodes.pop(int(key), None)
    return health


def problems_of_snapshot(doc, now, silent_after=SILENT_AFTER):
    """problems() over a status file's "node_health" (`citynode receive --status`)."""
    return from_snapshot(doc, now).problems(now, silent_after)
