"""The [fatbox] section of nova.conf."""

from oslo_config import cfg

import nova.conf

fatbox_group = cfg.OptGroup(
    "fatbox", title="fatbox options", help="The fatbox compute driver (fat containers)."
)

fatbox_opts = [
    cfg.StrOpt(
        "socket",
        default="/run/fatbox/fatboxd.sock",
        help="Unix socket of fatboxd's REST API.",
    ),
    cfg.IntOpt(
        "api_timeout",
        default=600,
        min=1,
        help="Seconds one API call to fatboxd may take.",
    ),
    cfg.IntOpt(
        "boot_timeout",
        default=300,
        min=1,
        help="Seconds spawn waits for the instance to reach RUNNING (systemd up).",
    ),
    cfg.IntOpt(
        "default_root_gb",
        default=10,
        min=1,
        help="Root disk size when the flavor says 0 GB (fatbox always gives a disk).",
    ),
    cfg.StrOpt(
        "image_template",
        default="{image_id}",
        help="fatboxd image reference for a Glance image: {image_id} and {image_name} "
        "are replaced. The default passes the Glance id, which fatboxd resolves through "
        "its image bridge (or a local image of that name).",
    ),
    cfg.BoolOpt(
        "config_drive",
        default=True,
        help="Write the instance metadata (Nova's config-drive files) into a directory "
        "bound read-only at /config-drive, for cloud-init's ConfigDrive datasource.",
    ),
    cfg.FloatOpt(
        "event_poll_interval",
        default=1.0,
        min=0,
        help="Seconds between polls of fatboxd for power-state changes made inside the "
        "guest (a shutdown from within reaches Nova as a lifecycle event). 0 disables.",
    ),
]


def register(conf=None):
    conf = conf or nova.conf.CONF
    conf.register_group(fatbox_group)
    conf.register_opts(fatbox_opts, group=fatbox_group)


def list_opts():
    return {fatbox_group: fatbox_opts}
