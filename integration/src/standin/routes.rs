//! Where a request goes, from its URL as kube-apiserver lays it out: discovery documents, or a resource
//! (`/api/v1/namespaces/NS/pods/NAME/status`, `/apis/GROUP/VERSION/...`, the old `/watch/` prefix).

use serde_json::Value;

use super::errors::ApiError;
use super::resources::{self, Resource};

/// Where a request goes: a resource, the namespace and name on the URL, and a subresource.
pub struct Target {
    pub res: &'static Resource,
    pub ns: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
    /// The old `/watch/` path prefix.
    pub watch_path: bool,
}

pub enum Route {
    Doc(Value),
    Resource(Target),
}

pub fn route(path: &str, address: &str) -> Result<Route, ApiError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Ok(Route::Doc(resources::version())),
        ["api"] => return Ok(Route::Doc(resources::core_versions(address))),
        ["apis"] => return Ok(Route::Doc(resources::group_list())),
        ["openapi", "v3"] => return Ok(Route::Doc(resources::openapi_index())),
        ["openapi", "v3", "api", v] => {
            return resources::openapi_group_version("", v)
                .map(Route::Doc)
                .ok_or_else(ApiError::no_route)
        }
        ["openapi", "v3", "apis", g, v] => {
            return resources::openapi_group_version(g, v)
                .map(Route::Doc)
                .ok_or_else(ApiError::no_route)
        }
        ["api", v] => {
            return resources::resource_list("", v)
                .map(Route::Doc)
                .ok_or_else(ApiError::no_route)
        }
        ["apis", g] => {
            return resources::group(g)
                .map(Route::Doc)
                .ok_or_else(ApiError::no_route)
        }
        ["apis", g, v] => {
            return resources::resource_list(g, v)
                .map(Route::Doc)
                .ok_or_else(ApiError::no_route)
        }
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::no_route()),
    };
    let (watch_path, rest) = match rest {
        ["watch", r @ ..] => (true, r),
        r => (false, r),
    };
    // `namespaces/X` and `namespaces/X/status` are the namespace itself; `namespaces/X/<plural>…` is inside it.
    let (ns, rest) = match rest {
        ["namespaces", ns, r @ ..] if !matches!(r, [] | ["status"]) => (Some(ns.to_string()), r),
        r => (None, r),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(n.to_string()), None),
        [p, n, s] => (*p, Some(n.to_string()), Some(s.to_string())),
        _ => return Err(ApiError::no_route()),
    };
    let res = resources::find(group, version, plural).ok_or_else(ApiError::no_route)?;
    if ns.is_some() && !res.namespaced {
        return Err(ApiError::no_route());
    }
    if let Some(s) = &sub {
        if !res.subresources.contains(&s.as_str()) {
            return Err(ApiError::no_route());
        }
    }
    Ok(Route::Resource(Target {
        res,
        ns,
        name,
        sub,
        watch_path,
    }))
}
