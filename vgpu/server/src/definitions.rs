//! Persistent vGPU definitions, the way `mdevctl define` keeps mdev devices: one JSON file
//! per definition in `STATE_DIR/vgpus/UUID.json`, written atomically (a temporary file in the
//! same directory, synced, linked into place, then the directory synced), so a crash or a
//! SIGKILL at any point leaves either the old set of definitions or the new one, never a
//! half-written file. `tessera vgpu define` and `undefine` write them (with or without a
//! running server); `tessera serve --state-dir` reads them at start and creates the
//! `autostart` ones. Changes are serialised by an advisory lock on `vgpus/.lock`, so two
//! concurrent `define`s cannot both take one name.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vgpu::profile::{self, Profile};
use vgpu::sched::Params;

use crate::RequestError;
use crate::control::{Request, SCHEMA};

/// Default state directory of `tessera serve` and `tessera vgpu define`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tessera";

/// A vGPU instance that outlives the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    /// Version of these fields ([`SCHEMA`]).
    pub schema: u32,
    /// Its address; also the file name.
    pub uuid: Uuid,
    /// Instance name.
    pub name: String,
    /// Type (profile) name.
    #[serde(rename = "type")]
    pub profile: String,
    /// Partition (`None`: wherever it fits).
    pub partition: Option<usize>,
    /// Weight under fixed-share scheduling.
    pub weight: u32,
    /// Cap on GPU time in percent.
    pub cap: u32,
    /// The user whose VMM may attach besides root (`None`: the server's user).
    pub owner: Option<u32>,
    /// Created when the server starts.
    pub autostart: bool,
}

/// A request's checked parameters: what both a `create` and a definition must satisfy.
#[derive(Debug, Clone, Copy)]
pub struct Checked {
    /// The type.
    pub profile: &'static Profile,
    /// Weight and cap.
    pub params: Params,
}

/// Checks a type name, an instance name, a weight and a cap (the rules of `create`).
pub fn check(
    profile: &str,
    name: Option<&str>,
    weight: Option<u32>,
    cap: Option<u32>,
) -> Result<Checked, RequestError> {
    let p = profile::find(profile).ok_or_else(|| {
        let known: Vec<_> = profile::PROFILES.iter().map(|p| p.name).collect();
        RequestError::UnknownType {
            name: profile.to_string(),
            known: known.join(", "),
        }
    })?;
    if let Some(n) = name
        && !crate::valid_name(n)
    {
        return Err(RequestError::Name(n.to_string()));
    }
    let params = Params {
        weight: weight.unwrap_or(1),
        cap_percent: cap.unwrap_or(100),
    };
    let (w, c) = (vgpu::sched::WEIGHTS, vgpu::sched::CAPS);
    for (what, value, range) in [("weight", params.weight, w), ("cap", params.cap_percent, c)] {
        if !range.contains(&value) {
            return Err(RequestError::OutOfRange {
                what,
                value: value.into(),
                allowed: format!("{range:?}"),
            });
        }
    }
    Ok(Checked { profile: p, params })
}

impl Definition {
    /// The `create` request that brings it up.
    pub fn request(&self) -> Request {
        Request::Create {
            profile: self.profile.clone(),
            name: Some(self.name.clone()),
            uuid: Some(self.uuid),
            partition: self.partition,
            weight: Some(self.weight),
            cap: Some(self.cap),
            owner: self.owner,
        }
    }

    /// Whether `key` (a name or a UUID) names it.
    pub fn is(&self, key: &str) -> bool {
        self.name == key || Uuid::parse_str(key).is_ok_and(|u| u == self.uuid)
    }

    fn check(&self) -> Result<(), RequestError> {
        check(
            &self.profile,
            Some(&self.name),
            Some(self.weight),
            Some(self.cap),
        )
        .map(|_| ())
    }
}

/// Why definitions could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    /// A file or the directory could not be read or written.
    #[error("cannot {what} {path}")]
    Io {
        /// What failed.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A definition file that is not a valid definition.
    #[error("corrupt vGPU definition {path}: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The definition's values are refused.
    #[error(transparent)]
    Invalid(#[from] RequestError),
    /// The name or UUID is already defined.
    #[error("vGPU {0:?} is already defined (undefine it first)")]
    Exists(String),
    /// Nothing is defined under that name or UUID.
    #[error("no vGPU definition {0:?}")]
    Missing(String),
}

/// The definitions under one state directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The definitions of state directory `state_dir` (in its `vgpus` subdirectory).
    pub fn new(state_dir: &Path) -> Self {
        Store {
            dir: state_dir.join("vgpus"),
        }
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(
        &self,
        what: &'static str,
        path: &Path,
    ) -> impl FnOnce(std::io::Error) -> DefinitionError {
        let path = path.to_path_buf();
        move |source| DefinitionError::Io { what, path, source }
    }

    /// Every definition, by name. A directory that does not exist holds none; a file that is
    /// not a valid definition is an error naming it (never a silently smaller set).
    pub fn load(&self) -> Result<Vec<Definition>, DefinitionError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io("read", &self.dir)(e)),
        };
        let mut defs: Vec<Definition> = Vec::new();
        for entry in entries {
            let entry = entry.map_err(self.io("read", &self.dir))?;
            let path = entry.path();
            let file_name = entry.file_name();
            let Some(stem) = file_name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                // The lock and temporary files of an interrupted write.
                continue;
            };
            if stem.starts_with('.') {
                continue;
            }
            let corrupt = |why: String| DefinitionError::Corrupt {
                path: path.clone(),
                why,
            };
            let text = std::fs::read(&path).map_err(self.io("read", &path))?;
            let d: Definition =
                serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
            if d.schema != SCHEMA {
                return Err(corrupt(format!(
                    "schema {} (this tessera reads {SCHEMA})",
                    d.schema
                )));
            }
            if Uuid::parse_str(stem).ok() != Some(d.uuid) {
                return Err(corrupt(format!(
                    "its uuid is {}, not its file name",
                    d.uuid
                )));
            }
            d.check().map_err(|e| corrupt(devices::error_chain(&e)))?;
            if let Some(other) = defs.iter().find(|o| o.name == d.name) {
                return Err(corrupt(format!(
                    "name {:?} is also defined by {}.json",
                    d.name, other.uuid
                )));
            }
            defs.push(d);
        }
        defs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(defs)
    }

    /// The definition named `key` (a name or a UUID).
    pub fn find(&self, key: &str) -> Result<Definition, DefinitionError> {
        self.load()?
            .into_iter()
            .find(|d| d.is(key))
            .ok_or_else(|| DefinitionError::Missing(key.to_string()))
    }

    /// Takes the store's lock (released when the file is dropped), creating the directory.
    fn lock(&self) -> Result<File, DefinitionError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(&self.dir)
            .map_err(self.io("create", &self.dir))?;
        let path = self.dir.join(".lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(self.io("open", &path))?;
        f.lock().map_err(self.io("lock", &path))?;
        Ok(f)
    }

    /// Makes a change to the directory durable.
    fn sync_dir(&self) -> Result<(), DefinitionError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(self.io("sync", &self.dir))
    }

    /// Adds `def`, atomically: its name and UUID must be new.
    pub fn define(&self, def: &Definition) -> Result<(), DefinitionError> {
        def.check()?;
        let _lock = self.lock()?;
        for d in self.load()? {
            if d.name == def.name {
                return Err(DefinitionError::Exists(def.name.clone()));
            }
            if d.uuid == def.uuid {
                return Err(DefinitionError::Exists(def.uuid.to_string()));
            }
        }
        let path = self.dir.join(format!("{}.json", def.uuid));
        let mut tmp = tempfile::Builder::new()
            .prefix(".")
            .suffix(".tmp")
            .tempfile_in(&self.dir)
            .map_err(self.io("create a file in", &self.dir))?;
        let mut text = serde_json::to_vec_pretty(def).map_err(|e| DefinitionError::Corrupt {
            path: path.clone(),
            why: e.to_string(),
        })?;
        text.push(b'\n');
        tmp.write_all(&text)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(self.io("write", tmp.path()))?;
        tmp.persist_noclobber(&path)
            .map_err(|e| self.io("write", &path)(e.error))?;
        self.sync_dir()
    }

    /// Removes the definition named `key` (a name or a UUID) and returns it.
    pub fn undefine(&self, key: &str) -> Result<Definition, DefinitionError> {
        let _lock = self.lock()?;
        let def = self.find(key)?;
        let path = self.dir.join(format!("{}.json", def.uuid));
        std::fs::remove_file(&path).map_err(self.io("remove", &path))?;
        self.sync_dir()?;
        Ok(def)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tessera-defs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn def(name: &str) -> Definition {
        Definition {
            schema: SCHEMA,
            uuid: Uuid::new_v4(),
            name: name.into(),
            profile: "64M".into(),
            partition: None,
            weight: 3,
            cap: 50,
            owner: None,
            autostart: true,
        }
    }

    #[test]
    fn definitions_survive_and_are_found_by_name_or_uuid() {
        let dir = scratch("roundtrip");
        let store = Store::new(&dir);
        assert!(
            store.load().unwrap().is_empty(),
            "no directory, no definitions"
        );
        let (a, b) = (def("b-second"), def("a-first"));
        store.define(&a).unwrap();
        store.define(&b).unwrap();
        // A fresh store (a restarted server) reads the same, sorted by name.
        let again = Store::new(&dir).load().unwrap();
        assert_eq!(again, vec![b.clone(), a.clone()]);
        assert_eq!(store.find(&a.uuid.to_string()).unwrap(), a);
        assert_eq!(store.find("a-first").unwrap(), b);
        // Names and UUIDs are unique.
        let mut dup = def("a-first");
        assert!(matches!(
            store.define(&dup),
            Err(DefinitionError::Exists(_))
        ));
        dup.name = "other".into();
        dup.uuid = a.uuid;
        assert!(matches!(
            store.define(&dup),
            Err(DefinitionError::Exists(_))
        ));
        // Refused values are refused before anything is written.
        let mut bad = def("bad");
        bad.weight = 0;
        assert!(matches!(
            store.define(&bad),
            Err(DefinitionError::Invalid(_))
        ));
        assert_eq!(store.undefine(&a.uuid.to_string()).unwrap(), a);
        assert!(matches!(
            store.undefine("b-second"),
            Err(DefinitionError::Missing(_))
        ));
        assert_eq!(store.load().unwrap(), vec![b]);
        // Only definitions and the lock are left: no temporary files.
        let mut names: Vec<_> = std::fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(names[0], ".lock");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupt_definition_is_an_error_naming_its_file() {
        let dir = scratch("corrupt");
        let store = Store::new(&dir);
        let good = def("good");
        store.define(&good).unwrap();
        // A temporary file left by a write that was interrupted is ignored.
        std::fs::write(store.dir().join(".abc.tmp"), b"{\"half").unwrap();
        assert_eq!(store.load().unwrap(), vec![good.clone()]);
        let u = Uuid::new_v4();
        let path = store.dir().join(format!("{u}.json"));
        let cases: Vec<(String, &str)> = vec![
            ("{\"schema\":1,".into(), "EOF"),
            ("[]".into(), "expected struct"),
            (
                serde_json::to_string(&Definition {
                    uuid: u,
                    ..def("x")
                })
                .unwrap()
                .replace("\"64M\"", "\"3G\""),
                "unknown vGPU type",
            ),
            (
                serde_json::to_string(&Definition {
                    uuid: u,
                    ..def("good")
                })
                .unwrap(),
                "also defined",
            ),
            (
                serde_json::to_string(&def("y")).unwrap(),
                "not its file name",
            ),
            (
                serde_json::to_string(&Definition {
                    uuid: u,
                    schema: 99,
                    ..def("z")
                })
                .unwrap(),
                "schema 99",
            ),
        ];
        for (text, why) in cases {
            std::fs::write(&path, &text).unwrap();
            let e = store.load().unwrap_err();
            let msg = devices::error_chain(&e);
            assert!(
                msg.contains(store.dir().to_str().unwrap())
                    && msg.contains(&format!("{u}.json"))
                    && msg.contains(why),
                "{text}: {msg}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
