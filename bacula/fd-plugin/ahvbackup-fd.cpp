/*
 * ahvbackup-fd.so: the Bacula File Daemon plugin of ahvbackup.
 *
 * Written for the ahvbackup project (agentless backup of Nutanix AHV VMs). This file only
 * defines the constants that Bacula's metaplugin library (src/plugins/fd/pluginlib/ of the
 * Bacula source tree) asks a plugin to define; the library does the rest: it loads as
 * `ahvbackup-fd.so`, claims every FileSet line `Plugin = "ahvbackup: key=value ..."`, runs the
 * backend program `<directory of bacula-fd>/ahvbackup-bacula-backend` once per plugin line and
 * speaks the metaplugin protocol with it over its stdin/stdout.
 *
 * Every key=value of the plugin string goes to the backend unchanged. The backend (ahvbackup's
 * configuration schema) is the one place that knows the keys: it refuses an unknown key or a
 * bad value with one job error naming each, so the plugin keeps no list of its own that could
 * drift from it (see valid_params below).
 *
 * Build: bacula/fd-plugin/build.sh (docs/bacula-fd-plugin.md).
 */

#include "pluginlib/pluginlib.h"
#include "pluginlib/metaplugin.h"

/* what `status client` and the plugin listing show */
const char *PLUGIN_LICENSE       = "AGPLv3";
const char *PLUGIN_AUTHOR        = "the ahvbackup authors";
const char *PLUGIN_DATE          = "December 2026";
const char *PLUGIN_VERSION       = "1.0.0";
const char *PLUGIN_DESCRIPTION   = "ahvbackup: agentless backup of Nutanix AHV VMs";

/* `Plugin = "ahvbackup: ..."` lines, job messages prefixed "ahvbackup: " */
const char *PLUGINPREFIX         = "ahvbackup:";
/* the name in the backend's handshake: "Hello ahvbackup 3" */
const char *PLUGINNAME           = "ahvbackup";
/* virtual file names: /@ahvbackup/<cluster>/<vm>/... ; sent to the backend as Namespace= */
const char *PLUGINNAMESPACE      = "@ahvbackup";
const bool CUSTOMNAMESPACE       = true;
const bool CUSTOMPREVJOBNAME     = false;
const char *PLUGINAPI            = "3";
/* run as <bVarExePath>/ahvbackup-bacula-backend: install a link next to bacula-fd */
const char *BACKEND_CMD          = "ahvbackup-bacula-backend";
/* after SIGUSR1 (job cancelled) give the backend this many seconds to release what it made
 * on the cluster (snapshots, volume groups, iSCSI sessions) before it is terminated */
const int32_t CUSTOMCANCELSLEEP  = 10;

checkFile_t checkFile = NULL;
const bool CORELOCALRESTORE = false;           /* the backend writes every restored file */
const bool ACCURATEPLUGINPARAMETER = true;     /* tell the backend "Accurate=1" */
const int ADDINCLUDESTRIPOPTION = 0;
const bool DONOTSAVE_FT_PLUGIN_CONFIG = false; /* keep the restore options below with a Full */
const uint32_t BACKEND_TIMEOUT = 0;            /* the library's default (3600 s) */

const metadataTypeMap plugin_metadata_map[] = {{NULL, plugin_meta_invalid}};

/*
 * The plugin parameters accepted without a job message. The library matches each parameter
 * by prefix (strncasecmp over the length of the entry), so the one empty entry accepts every
 * parameter: all of them are passed to the backend as they are and checked there.
 */
const char *valid_params[] =
{
   "",
   NULL
};

/*
 * Restore options (bconsole: restore ... "mod" -> plugin options, or the restore API): sent
 * to the backend as key=value parameters when set. Same names as ahvbackup's configuration
 * keys (docs/configuration.md).
 */
struct ini_items plugin_items_dump[] =
{
/* name                  handler          comment                                     required default */
   {"restore_disks_only", ini_store_str,  "Restore only these disks (e.g. scsi.0,scsi.1)", 0, NULL},
   {"restore_vm_name",    ini_store_str,  "Name of the restored VM",                       0, NULL},
   {"target_cluster",     ini_store_str,  "Cluster to restore the VM to",                  0, NULL},
   {"target_container",   ini_store_str,  "Storage container for the restored disks",      0, NULL},
   {"network_map",        ini_store_str,  "Network mapping (from=to,...)",                 0, NULL},
   {"power_on",           ini_store_bool, "Power the restored VM on",                      0, NULL},
   {NULL, NULL, NULL, 0, NULL}
};
