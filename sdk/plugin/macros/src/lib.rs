//! The `#[processor]` and `#[partitioner]` attributes of `quiver-plugin-sdk`.
//!
//! They keep the annotated function as written and add the component export glue
//! that calls it: decoding the batch, calling the function per record, encoding the
//! output. No `syn`: the only thing read from the item is the function's name.

use proc_macro::{Delimiter, TokenStream, TokenTree};

/// Marks `fn process(record: Record) -> impl Into<Output>` as the plugin's processor.
#[proc_macro_attribute]
pub fn processor(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(attr, item, Role::Processor)
}

/// Marks `fn partition(key: Option<&[u8]>, value: &[u8], partition_count: u32) -> u32`
/// as the plugin's partitioner.
#[proc_macro_attribute]
pub fn partitioner(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(attr, item, Role::Partitioner)
}

enum Role {
    Processor,
    Partitioner,
}

fn expand(attr: TokenStream, item: TokenStream, role: Role) -> TokenStream {
    if !attr.is_empty() {
        return compile_error("this attribute takes no arguments");
    }
    let Some(name) = fn_name(&item) else {
        return compile_error("expected a function");
    };
    let glue = match role {
        Role::Processor => format!(
            "#[doc(hidden)] pub struct __QuiverPlugin;
             impl ::quiver_plugin_sdk::__bindings::Guest for __QuiverPlugin {{
                 fn process_batch(batch: ::std::vec::Vec<u8>) -> ::core::result::Result<::std::vec::Vec<u8>, ::std::string::String> {{
                     ::quiver_plugin_sdk::__run_processor(&batch, |r| ::core::convert::Into::<::quiver_plugin_sdk::Output>::into({name}(r)))
                 }}
                 fn partition(_key: ::core::option::Option<::std::vec::Vec<u8>>, _value: ::std::vec::Vec<u8>, _n: u32) -> ::core::result::Result<u32, ::std::string::String> {{
                     ::core::result::Result::Err(::std::string::String::from(\"this plugin is a processor, not a partitioner\"))
                 }}
             }}
             ::quiver_plugin_sdk::__bindings::__export!(__QuiverPlugin with_types_in ::quiver_plugin_sdk::__bindings);"
        ),
        Role::Partitioner => format!(
            "#[doc(hidden)] pub struct __QuiverPlugin;
             impl ::quiver_plugin_sdk::__bindings::Guest for __QuiverPlugin {{
                 fn process_batch(_batch: ::std::vec::Vec<u8>) -> ::core::result::Result<::std::vec::Vec<u8>, ::std::string::String> {{
                     ::core::result::Result::Err(::std::string::String::from(\"this plugin is a partitioner, not a processor\"))
                 }}
                 fn partition(key: ::core::option::Option<::std::vec::Vec<u8>>, value: ::std::vec::Vec<u8>, n: u32) -> ::core::result::Result<u32, ::std::string::String> {{
                     ::quiver_plugin_sdk::__run_partitioner(|| {name}(key.as_deref(), &value, n))
                 }}
             }}
             ::quiver_plugin_sdk::__bindings::__export!(__QuiverPlugin with_types_in ::quiver_plugin_sdk::__bindings);"
        ),
    };
    let mut out = item;
    match glue.parse::<TokenStream>() {
        Ok(g) => out.extend(g),
        Err(_) => return compile_error("internal error: bad glue"),
    }
    out
}

/// The identifier following the `fn` keyword at the top level of the item.
fn fn_name(item: &TokenStream) -> Option<String> {
    let mut after_fn = false;
    for tt in item.clone() {
        match tt {
            TokenTree::Ident(id) if after_fn => return Some(id.to_string()),
            TokenTree::Ident(id) if id.to_string() == "fn" => after_fn = true,
            TokenTree::Group(g) if g.delimiter() == Delimiter::Brace => return None,
            _ => {}
        }
    }
    None
}

fn compile_error(msg: &str) -> TokenStream {
    format!("::core::compile_error!({msg:?});")
        .parse()
        .unwrap_or_default()
}
