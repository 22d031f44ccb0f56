#!/bin/bash
# shellcheck shell=bash
# fatbox DevStack plugin: builds and installs fatboxd, fatbox-procfs and the Nova driver
# (nova.virt.fatbox), writes /etc/fatbox/fatbox.toml, systemd units and nova.conf.
# The hypervisor hooks (install/configure/start) run from lib/nova_plugins/hypervisor-fatbox;
# this file adds what DevStack's phases need around them.

# shellcheck source=devstack/lib/fatbox
source "$FATBOX_DIR/devstack/lib/fatbox"

if [[ "$1" == "stack" ]]; then
    case "$2" in
        pre-install)
            fatbox_install_packages
            ;;
        install)
            # Normally done by install_nova_hypervisor; again here in case VIRT_DRIVER is
            # not fatbox (fatboxd alongside another hypervisor for trying it out).
            [[ "$VIRT_DRIVER" == "fatbox" ]] || fatbox_install
            ;;
        post-config)
            fatbox_write_config "$FATBOX_CONF_DIR/fatbox.toml"
            fatbox_write_units "$FATBOX_SYSTEMD_DIR"
            [[ "$VIRT_DRIVER" == "fatbox" ]] && fatbox_configure_nova "$NOVA_CONF"
            ;;
        extra)
            fatbox_set_image_properties
            ;;
    esac
elif [[ "$1" == "unstack" ]]; then
    fatbox_stop_services
elif [[ "$1" == "clean" ]]; then
    fatbox_clean
fi
